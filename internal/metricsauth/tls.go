package metricsauth

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"slices"
	"sync"
	"time"
)

// SelfSignedValidity is how long a self-signed certificate is valid. The
// agent makes a new one at every start.
const SelfSignedValidity = 365 * 24 * time.Hour

// ServerTLS returns the TLS configuration of an HTTPS listener: the PEM
// certificate (chain) and key in certFile and keyFile, read again when
// either file changes (cert-manager and Secret volumes replace them in
// place), or, when both are empty, a self-signed certificate made now
// for hosts (names and IP addresses). HTTP/1.1 only, TLS 1.2 or later.
func ServerTLS(certFile, keyFile string, hosts []string, log *slog.Logger) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}}
	switch {
	case certFile == "" && keyFile == "":
		cert, err := SelfSigned(hosts, time.Now())
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{cert}
	case certFile == "" || keyFile == "":
		return nil, errors.New("want both a certificate and a key file, or neither")
	default:
		if log == nil {
			log = slog.New(slog.DiscardHandler)
		}
		fc := &fileCert{certFile: certFile, keyFile: keyFile, log: log}
		if _, err := fc.get(nil); err != nil {
			return nil, err
		}
		cfg.GetCertificate = fc.get
	}
	return cfg, nil
}

// SelfSigned makes an ECDSA P-256 certificate for hosts, valid from an
// hour before now for SelfSignedValidity.
func SelfSigned(hosts []string, now time.Time) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "pktmeta-agent", Organization: []string{"pktmeta"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(SelfSignedValidity),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	for _, h := range hosts {
		if h == "" {
			continue
		}
		if ip := net.ParseIP(h); ip != nil {
			if !slices.ContainsFunc(tmpl.IPAddresses, ip.Equal) {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			}
		} else if !slices.Contains(tmpl.DNSNames, h) {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("self-signed certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

// fileCert serves a certificate from files, reloaded when they change.
type fileCert struct {
	certFile, keyFile string
	log               *slog.Logger

	mu         sync.Mutex
	cert       *tls.Certificate
	certStamp  stamp
	keyStamp   stamp
	lastFailed stamp // certStamp of the last failed reload, logged once
}

type stamp struct {
	mod  time.Time
	size int64
}

func stampOf(path string) (stamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return stamp{}, err
	}
	return stamp{mod: fi.ModTime(), size: fi.Size()}, nil
}

func (f *fileCert) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cs, err1 := stampOf(f.certFile)
	ks, err2 := stampOf(f.keyFile)
	if err := errors.Join(err1, err2); err != nil {
		if f.cert != nil {
			return f.cert, nil // mid-rotation: keep serving the last good one
		}
		return nil, err
	}
	if f.cert != nil && cs == f.certStamp && ks == f.keyStamp {
		return f.cert, nil
	}
	cert, err := tls.LoadX509KeyPair(f.certFile, f.keyFile)
	if err != nil {
		if f.cert != nil {
			if cs != f.lastFailed {
				f.log.Warn("metrics certificate not reloaded; serving the previous one", "cert", f.certFile, "err", err)
				f.lastFailed = cs
			}
			return f.cert, nil
		}
		return nil, fmt.Errorf("metrics certificate: %w", err)
	}
	if f.cert != nil {
		f.log.Info("metrics certificate reloaded", "cert", f.certFile)
	}
	f.cert, f.certStamp, f.keyStamp = &cert, cs, ks
	return f.cert, nil
}
