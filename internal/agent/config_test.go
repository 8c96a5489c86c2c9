package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestConfigFileAndValidation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	os.WriteFile(path, []byte(`
plugin:
  tags: {cluster: prod}
  strictSource: true
  maxConnections: 65536
  attachMode: auto
labelTags: [app.kubernetes.io/name]
gcInterval: 10s
`), 0o644)
	c := Defaults()
	if err := c.LoadFile(path); err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	e, err := c.PluginEntry()
	if err != nil || e["type"] != "pktmeta" || e["strictSource"] != true || e["maxConnections"] != uint32(65536) {
		t.Fatalf("entry %v %v", e, err)
	}

	os.WriteFile(path, []byte("plugin:\n  tag: {a: b}\n"), 0o644)
	c = Defaults()
	if err := c.LoadFile(path); err == nil || !strings.Contains(err.Error(), "tag") {
		t.Fatalf("unknown key: %v", err)
	}
	for _, bad := range []func(*Config){
		func(c *Config) { c.Plugin.MaxConnections = 5 },
		func(c *Config) { c.Plugin.AttachMode = "xdp" },
		func(c *Config) { c.UninstallOnExit = "sometimes" },
		func(c *Config) { c.CNIConfDir = "relative" },
		func(c *Config) { c.Plugin.Tags = map[string]string{"bad key": "v"} },
	} {
		c := Defaults()
		bad(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("accepted %+v", c)
		}
	}
}
