#!/usr/bin/env bash
# Rebuilds the bpf2go output in a copy of the tree and fails if it differs
# from what is committed: the objects must be reproducible from source.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$tmp"
(cd "$tmp" && go generate ./internal/datapath/... ./examples/... ./bench/...)
status=0
while IFS= read -r f; do
	if ! cmp -s "$f" "$tmp/$f"; then
		echo "check-generate: $f differs from a fresh 'make generate'" >&2
		status=1
	fi
done < <(git ls-files '*_bpfel.go' '*_bpfel.o')
[[ $status -eq 0 ]] && echo "check-generate: bpf2go output is reproducible"
exit $status
