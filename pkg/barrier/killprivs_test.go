package barrier

import (
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// suidReadOnlyCopy, as user nobody, opens file (setuid root, mode 04755:
// nobody may read it, not write it) O_RDONLY|O_DSYNC and copies into that
// read-only descriptor. The kernel refuses: EBADF, and the file is left
// as it is. Exit 0 on EBADF.
func suidReadOnlyCopy(file, call string) int {
	src, err := os.CreateTemp("", "src")
	if err != nil {
		return 190
	}
	src.WriteString("x")
	if err := unix.Setgid(65534); err != nil {
		return 191
	}
	if err := unix.Setuid(65534); err != nil {
		return 192
	}
	dst, err := unix.Open(file, unix.O_RDONLY|unix.O_DSYNC, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "open:", err)
		return 193
	}
	if dst < SyncFDBase {
		fmt.Fprintln(os.Stderr, "O_DSYNC file at descriptor", dst)
		return 194
	}
	off := int64(0)
	switch call {
	case "copy_file_range":
		_, err = unix.CopyFileRange(int(src.Fd()), &off, dst, nil, 1, 0)
	case "sendfile":
		_, err = unix.Sendfile(dst, int(src.Fd()), &off, 1)
	}
	if err != unix.EBADF {
		fmt.Fprintln(os.Stderr, call, "into a read-only descriptor:", err)
		return 195
	}
	return 0
}

// TestCopyIntoReadOnlyDescriptorLeavesSetuid: an unprivileged caller may
// open a setuid-root program for reading with O_DSYNC (the supervisor
// installs it at SyncFDBase or above), then ask to copy into it. The
// kernel refuses with EBADF and changes nothing; the supervisor's
// killPrivs runs before the copy, as root, and clears the setuid bit of a
// file the caller may not write (/usr/bin/passwd, sudo...).
func TestCopyIntoReadOnlyDescriptorLeavesSetuid(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, call := range []string{"copy_file_range", "sendfile"} {
		t.Run(call, func(t *testing.T) {
			dir, err := os.MkdirTemp("", "duet-suid-ro")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			os.Chmod(dir, 0o755)
			file := filepath.Join(dir, "prog")
			if err := os.WriteFile(file, []byte("#!/bin/sh\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(file, 0o755|os.ModeSetuid); err != nil {
				t.Fatal(err)
			}
			t.Setenv("DUET_BARRIER_HELPER", "suid-readonly-copy")
			t.Setenv("DUET_BARRIER_FILE", file)
			t.Setenv("DUET_BARRIER_CALL", call)
			var n atomic.Int32
			code := supervise(t, counting(&n, nil), self)
			st, err := os.Stat(file)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode()&os.ModeSetuid == 0 {
				t.Fatalf("uid 65534, refused a %s into its read-only descriptor (helper exit %d), cleared the setuid bit of a root-owned 04755 file: now %v",
					call, code, st.Mode())
			}
			if code != 0 {
				t.Fatalf("helper exit %d", code)
			}
		})
	}
}
