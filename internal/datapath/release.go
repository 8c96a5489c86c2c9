package datapath

// Release orders builds of the BPF datapath. A pinned datapath from a lower
// release is upgraded in place; one from a higher release, or another build
// of this one, is refused: a node never silently runs older programs than
// it had. Bump it with every change to the BPF object (bpf/), and set
// releaseObject to the new object's sha256: TestReleaseNamesTheObject fails
// until both are done, so a changed datapath cannot ship under an old
// release number.
const Release = 8

// releaseObject is the sha256 of the BPF object of this Release.
const releaseObject = "056d6b6586a9684e3b13904dbbcb671aa667d79e6f6a02e5724a43f73503d61a"
