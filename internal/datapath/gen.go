package datapath

// The BPF object and its Go bindings are committed; `make generate`
// rebuilds them with the pinned clang-19. DWARF is stripped (BTF is kept),
// which also keeps build paths out of the object.
//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I../../bpf/include -I/usr/include/x86_64-linux-gnu" -target bpfel -go-package datapath -type pktmeta_tuple -type pktmeta_record -type pktmeta_alias -type pktmeta_slot -type pktmeta_table_info -type pktmeta_endpoint -type pktmeta_workload -type pktmeta_tag -type pktmeta_counters -type pktmeta_event -type pktmeta_event_v4 -type pktmeta_config -type pktmeta_sweep_args -type pktmeta_table_op -type pktmeta_inbound_flow -type pktmeta_node_config -type pktmeta_member_key -type pktmeta_remote_counters -type pktmeta_conn_origin -type pktmeta_netns_addrs bpf ../../bpf/pktmeta.c
