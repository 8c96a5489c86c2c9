// Package version names the pktmeta build. make image and the Dockerfile
// set Version at link time (-X) to the image's version, so that an
// operator can tell which build runs on a node (the agent logs it at start
// and exports pktmeta_build_info) while a rollout is under way.
package version

// Version is the build's version; "dev" when nothing set it.
var Version = "dev"

// LinkerFlag is the -X flag that sets Version.
const LinkerFlag = "github.com/pktmeta/pktmeta/internal/version.Version"
