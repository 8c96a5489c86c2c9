package datapath

// Release orders builds of the BPF datapath. A pinned datapath from a lower
// release is upgraded in place; one from a higher release, or another build
// of this one, is refused: a node never silently runs older programs than
// it had. Bump it with every change to the BPF object (bpf/), and set
// releaseObject to the new object's sha256: TestReleaseNamesTheObject fails
// until both are done, so a changed datapath cannot ship under an old
// release number.
const Release = 3

// releaseObject is the sha256 of the BPF object of this Release.
const releaseObject = "e4f2f3d9c904f16b88b7664578cb67c1ccbca2218fc1da9c62515d34b849f0fe"
