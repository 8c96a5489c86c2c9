package main

// The benchmark's own BPF programs (bench/bpf/anchors.c): committed like the
// datapath's, rebuilt by `make generate` with the pinned clang-19.
//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -target bpfel -go-package main anchors bpf/anchors.c

// The table-layout study (bench/bpf/tables.c, `--only tables`).
//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -target bpfel -go-package main tables bpf/tables.c

// The first delivery through Service DNAT, every repetition
// (bench/bpf/natfirst.c), against the public header's table layouts.
//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu -I../bpf/include" -target bpfel -go-package main natfirst bpf/natfirst.c

// What one cold memory access costs here, in the table's shapes
// (bench/bpf/access.c, `--only access`).
//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -target bpfel -go-package main access bpf/access.c
