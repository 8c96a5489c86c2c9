package datapath

// Release orders builds of the BPF datapath. A pinned datapath from a lower
// release is upgraded in place; one from a higher release, or another build
// of this one, is refused: a node never silently runs older programs than
// it had. Bump it with every change to the BPF object (bpf/), and set
// releaseObject to the new object's sha256: TestReleaseNamesTheObject fails
// until both are done, so a changed datapath cannot ship under an old
// release number.
const Release = 5

// releaseObject is the sha256 of the BPF object of this Release.
const releaseObject = "13884596c7c907570298d574f4dd647c39c0acb242a6dd06f21e08213c2a35e9"
