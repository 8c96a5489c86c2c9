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
  applicationUDP: false
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
	if err != nil || e["type"] != "pktmeta" || e["strictSource"] != true || e["maxConnections"] != uint32(65536) || e["applicationUDP"] != false {
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
		func(c *Config) { c.MetricsAddr = "9964" },
		func(c *Config) { c.MetricsAuth = "basic" },
		func(c *Config) { c.ClusterFile = "/nonexistent/cluster.json" },
		func(c *Config) { c.MetricsCertFile = "/etc/tls.crt" },
		func(c *Config) {
			c.MetricsAuth, c.MetricsCertFile, c.MetricsKeyFile = MetricsAuthInsecure, "/etc/tls.crt", "/etc/tls.key"
		},
		func(c *Config) {
			c.MetricsAuth, c.MetricsCertFile, c.MetricsKeyFile = MetricsAuthKubernetes, "tls.crt", "tls.key"
		},
	} {
		c := Defaults()
		bad(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("accepted %+v", c)
		}
	}
}

// Unauthenticated metrics stay on loopback unless asked for in so many
// words.
func TestMetricsListenerValidation(t *testing.T) {
	c := Defaults()
	if c.MetricsAddr != "127.0.0.1:9964" || c.MetricsAuth != MetricsAuthNone {
		t.Errorf("defaults %s %s, want 127.0.0.1:9964 without authentication", c.MetricsAddr, c.MetricsAuth)
	}
	for addr, loopback := range map[string]bool{
		"127.0.0.1:9964": true, "127.0.0.2:1": true, "[::1]:9964": true, "localhost:9964": true, "[::ffff:127.0.0.1]:1": true,
		":9964": false, "0.0.0.0:9964": false, "[::]:9964": false, "10.0.0.1:9964": false, "node-1:9964": false,
	} {
		for _, auth := range []string{MetricsAuthNone, MetricsAuthKubernetes, MetricsAuthInsecure} {
			c := Defaults()
			c.MetricsAddr, c.MetricsAuth = addr, auth
			err := c.Validate()
			if want := loopback || auth != MetricsAuthNone; (err == nil) != want {
				t.Errorf("metricsAddr %s metricsAuth %s: %v", addr, auth, err)
			}
			if err != nil && !strings.Contains(err.Error(), "metricsAuth: kubernetes") {
				t.Errorf("the refusal does not say how to serve it safely: %v", err)
			}
		}
	}
	c = Defaults()
	c.MetricsAddr, c.MetricsAuth, c.MetricsCertFile, c.MetricsKeyFile = ":9964", MetricsAuthKubernetes, "/etc/pktmeta/tls/tls.crt", "/etc/pktmeta/tls/tls.key"
	if err := c.Validate(); err != nil {
		t.Error(err)
	}
}
