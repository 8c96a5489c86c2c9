package datapath

// Release orders builds of the BPF datapath. A pinned datapath from a lower
// release is upgraded in place; one from a higher release, or another build
// of this one, is refused: a node never silently runs older programs than
// it had. Bump it with every change to the BPF object (bpf/), and set
// releaseObject to the new object's sha256: TestReleaseNamesTheObject fails
// until both are done, so a changed datapath cannot ship under an old
// release number.
const Release = 9

// releaseObject is the sha256 of the BPF object of this Release.
const releaseObject = "e10ac57fa6d03e8c48b4295cac0d5f75927d689d14b25db5671cdb78b3b5a4df"
