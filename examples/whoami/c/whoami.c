// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * whoami.c - a TCP server that tells each client who pktmeta says opened
 * the connection: one getsockopt on the accepted socket.
 *
 *   cc -O2 -I bpf/include -o whoami examples/whoami/c/whoami.c
 *   ./whoami 8080
 *
 * It answers every connection with one line, and logs it:
 *   shop/frontend uid=... conn=4097 tags: cluster=e2e pod-claimed: app=web
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pktmeta_origin.h"

static void describe(int fd, char *out, size_t len)
{
	struct pktmeta_conn_origin o;
	size_t n;

	if (pktmeta_origin_get(fd, &o) != 0) {
		if (errno == ENOENT || errno == EOPNOTSUPP || errno == ENOPROTOOPT)
			snprintf(out, len, "unknown: %s\n", strerror(errno));
		else
			snprintf(out, len, "error: %s\n", strerror(errno));
		return;
	}
	if (o.flags & PKTMETA_ORIGIN_F_REMOTE)
		n = snprintf(out, len, "node %u workload %u conn=%llu", o.origin_node, o.origin_workload,
			     (unsigned long long)o.conn_id);
	else
		n = snprintf(out, len, "%s/%s uid=%s conn=%llu", o.namespace, o.pod, o.uid,
			     (unsigned long long)o.conn_id);
	/* Operator's tags first, then what the pod claimed about itself. */
	for (int pass = 0; pass < 2 && n < len; pass++) {
		n += snprintf(out + n, len - n, pass ? " pod-claimed:" : " tags:");
		for (int i = 0; i < o.n_tags && i < PKTMETA_ORIGIN_MAX_TAGS && n < len; i++)
			if (!!(o.pod_tags & (1u << i)) == pass)
				n += snprintf(out + n, len - n, " %s=%s", o.tags[i].key, o.tags[i].value);
	}
	if (n < len)
		snprintf(out + n, len - n, "\n");
}

int main(int argc, char **argv)
{
	struct sockaddr_in6 addr = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_ANY_INIT };
	int one = 1, ls;

	if (argc != 2) {
		fprintf(stderr, "usage: %s PORT\n", argv[0]);
		return 2;
	}
	addr.sin6_port = htons(atoi(argv[1]));
	ls = socket(AF_INET6, SOCK_STREAM, 0); /* IPv4 clients arrive IPv4-mapped */
	if (ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(ls, (struct sockaddr *)&addr, sizeof(addr)) || listen(ls, 16)) {
		perror("listen");
		return 1;
	}
	for (;;) {
		char line[4096];
		int fd = accept(ls, NULL, NULL);

		if (fd < 0) {
			perror("accept");
			continue;
		}
		describe(fd, line, sizeof(line));
		fputs(line, stdout);
		fflush(stdout);
		if (write(fd, line, strlen(line)) < 0)
			perror("write");
		close(fd);
	}
}
