package datapath

// Release orders builds of the BPF datapath. A pinned datapath from a lower
// release is upgraded in place; one from a higher release, or another build
// of this one, is refused: a node never silently runs older programs than
// it had. Bump it with every change to the BPF object (bpf/), and set
// releaseObject to the new object's sha256: TestReleaseNamesTheObject fails
// until both are done, so a changed datapath cannot ship under an old
// release number.
const Release = 6

// releaseObject is the sha256 of the BPF object of this Release.
const releaseObject = "3d9605da4b06a909c359c040de4d9a74f9930b17e0817addcbfb10a8ffed1765"
