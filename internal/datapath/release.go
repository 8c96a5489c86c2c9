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
const releaseObject = "526c915eea674ebfcc22992ba4e4d785abc53aeef1d0a1fff405f105139ca338"
