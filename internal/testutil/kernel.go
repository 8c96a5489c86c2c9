package testutil

import (
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// KernelVersion is the running kernel's major and minor version, from
// uname. Tests use it only to check the product's feature probes against
// the version a feature came with, never to decide what the product does.
func KernelVersion() (major, minor int) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return 0, 0
	}
	return parseKernelVersion(unix.ByteSliceToString(u.Release[:]))
}

func parseKernelVersion(release string) (major, minor int) {
	f := strings.FieldsFunc(release, func(r rune) bool { return r < '0' || r > '9' })
	if len(f) < 2 {
		return 0, 0
	}
	major, _ = strconv.Atoi(f[0])
	minor, _ = strconv.Atoi(f[1])
	return major, minor
}

// KernelOlderThan reports whether the running kernel is older than
// version ("5.13").
func KernelOlderThan(version string) bool {
	wantMajor, wantMinor := parseKernelVersion(version)
	major, minor := KernelVersion()
	return major < wantMajor || (major == wantMajor && minor < wantMinor)
}
