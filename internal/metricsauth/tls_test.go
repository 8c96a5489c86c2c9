package metricsauth

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestSelfSigned(t *testing.T) {
	now := time.Now()
	cfg, err := ServerTLS("", "", []string{"127.0.0.1", "node-1", "", "127.0.0.1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Certificates) != 1 || cfg.MinVersion != tls.VersionTLS12 {
		t.Fatalf("config %+v", cfg)
	}
	leaf := cfg.Certificates[0].Leaf
	if leaf.Subject.CommonName != "pktmeta-agent" || len(leaf.IPAddresses) != 1 || !leaf.IPAddresses[0].Equal(net.ParseIP("127.0.0.1")) ||
		len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != "node-1" || leaf.IsCA {
		t.Errorf("certificate %v %v %v CA %v", leaf.Subject, leaf.IPAddresses, leaf.DNSNames, leaf.IsCA)
	}
	if leaf.NotBefore.After(now) || leaf.NotAfter.Before(now.Add(SelfSignedValidity-time.Hour)) {
		t.Errorf("valid %s to %s", leaf.NotBefore, leaf.NotAfter)
	}
	// A client that pins this certificate can verify it.
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: "node-1"}); err != nil {
		t.Errorf("verify against itself: %v", err)
	}
	if _, err := ServerTLS("/a", "", nil, nil); err == nil {
		t.Error("certificate without key accepted")
	}
}

func writePair(t *testing.T, dir, name string) {
	t.Helper()
	c, err := SelfSigned([]string{name}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	key, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	// Written beside and renamed over, as a Secret volume or cert-manager
	// swaps them.
	for f, b := range map[string][]byte{
		"tls.crt": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Certificate[0]}),
		"tls.key": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}),
	} {
		tmp := filepath.Join(dir, "."+f)
		if err := os.WriteFile(tmp, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCertificateFilesReload(t *testing.T) {
	dir := t.TempDir()
	crt, key := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if _, err := ServerTLS(crt, key, nil, nil); err == nil {
		t.Fatal("missing files accepted")
	}
	writePair(t, dir, "first")
	cfg, err := ServerTLS(crt, key, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	name := func() string {
		t.Helper()
		c, err := cfg.GetCertificate(&tls.ClientHelloInfo{})
		if err != nil {
			t.Fatal(err)
		}
		leaf, err := x509.ParseCertificate(c.Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		return leaf.DNSNames[0]
	}
	if n := name(); n != "first" {
		t.Fatalf("serving %s", n)
	}
	// Rotated: the next handshake gets the new one. (Stamps are mtime and
	// size; make sure the mtime differs on coarse filesystems.)
	writePair(t, dir, "second-one")
	future := time.Now().Add(time.Minute)
	os.Chtimes(crt, future, future)
	if n := name(); n != "second-one" {
		t.Fatalf("after rotation serving %s", n)
	}
	// A broken or half-written pair keeps the last good one.
	os.WriteFile(crt, []byte("garbage"), 0o600)
	if n := name(); n != "second-one" {
		t.Fatalf("after a bad write serving %s", n)
	}
	os.Remove(key)
	if n := name(); n != "second-one" {
		t.Fatalf("with the key gone serving %s", n)
	}
}
