package plugin

import (
	"io"
	"log/slog"
	"os"
)

// newLogger logs to the configured file, or to stderr: stdout carries the
// CNI result and nothing else. The returned closer flushes the file.
func newLogger(c *Config, verb, containerID, ifname string) (*slog.Logger, io.Closer) {
	var (
		w      io.Writer = os.Stderr
		closer io.Closer = io.NopCloser(nil)
	)
	if c != nil && c.LogFile != "" {
		f, err := os.OpenFile(c.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
		if err == nil {
			w, closer = f, f
		}
	}
	level := slog.LevelWarn
	if c != nil {
		level = c.logLevel
	}
	log := slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})).With(
		"plugin", "pktmeta", "verb", verb)
	if containerID != "" {
		log = log.With("containerID", containerID, "ifname", ifname)
	}
	return log, closer
}
