// Command pktmeta is the pktmeta chained CNI plugin.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/pktmeta/pktmeta/plugin"
)

func main() {
	skel.PluginMainFuncs(plugin.Funcs(), plugin.Versions(), "pktmeta: tags the first packet of every pod connection with who opened it")
}
