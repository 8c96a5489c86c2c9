package datapath

// Release orders builds of the BPF datapath. A pinned datapath from a lower
// release is upgraded in place; one from a higher release, or another build
// of this one, is refused: a node never silently runs older programs than
// it had. Bump it with every change to the BPF object (bpf/), and set
// releaseObject to the new object's sha256: TestReleaseNamesTheObject fails
// until both are done, so a changed datapath cannot ship under an old
// release number.
const Release = 7

// releaseObject is the sha256 of the BPF object of this Release.
const releaseObject = "1f75097970dd4c8e036b416d672cf5ad6df59dbe5e5c5f5d7319c6200750e39c"
