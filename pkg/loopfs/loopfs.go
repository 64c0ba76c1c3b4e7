// Package loopfs makes real filesystems on loop devices for tests: capture
// and replication must be exercised on ext4/xfs, never on the host's disk.
package loopfs

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// RequireRoot skips t, saying why, when not running as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: BPF, loop devices and mounts")
	}
}

// FS is a mounted loop filesystem.
type FS struct {
	Image string
	Dev   string
	Mount string
}

// Make creates an image of sizeMiB, formats it with fstype (ext4 or xfs),
// attaches it to a loop device and mounts it; t.Cleanup undoes all of it.
func Make(t testing.TB, fstype string, sizeMiB int) *FS {
	t.Helper()
	RequireRoot(t)
	mkfs, err := exec.LookPath("mkfs." + fstype)
	if err != nil {
		t.Skipf("mkfs.%s not installed: %v", fstype, err)
	}
	dir := t.TempDir()
	fs := &FS{Image: filepath.Join(dir, "disk.img"), Mount: filepath.Join(dir, "mnt")}
	if err := os.Truncate(fs.Image, int64(sizeMiB)<<20); err != nil {
		f, cerr := os.Create(fs.Image)
		if cerr != nil {
			t.Fatalf("creating image: %v", cerr)
		}
		f.Close()
		if err := os.Truncate(fs.Image, int64(sizeMiB)<<20); err != nil {
			t.Fatalf("sizing image: %v", err)
		}
	}
	args := []string{"-q", fs.Image}
	if fstype == "ext4" {
		args = []string{"-q", "-F", fs.Image}
	}
	run(t, mkfs, args...)
	fs.Dev = strings.TrimSpace(run(t, "losetup", "--find", "--show", fs.Image))
	t.Cleanup(func() { exec.Command("losetup", "-d", fs.Dev).Run() })
	if err := os.MkdirAll(fs.Mount, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "mount", fs.Dev, fs.Mount)
	t.Cleanup(func() { exec.Command("umount", "-l", fs.Mount).Run() })
	return fs
}

// Cool empties the caches of the filesystem, as dropping the page cache
// does for the whole machine: it is unmounted (its inodes, directory
// entries and pages go), the loop device's image is written back and its
// pages dropped from the host's cache, and it is mounted again. Nothing
// may hold a file of it open.
func (f *FS) Cool(t testing.TB) {
	t.Helper()
	// A goroutine of the code under test may still be leaving it (a
	// primary's keeper ends after its Run).
	for try := 0; ; try++ {
		out, err := exec.Command("umount", f.Mount).CombinedOutput()
		if err == nil {
			break
		}
		if try == 100 {
			t.Fatalf("umount %s: %v\n%s", f.Mount, err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	img, err := os.Open(f.Image)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(img.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatalf("dropping the cached pages of %s: %v", f.Image, err)
	}
	run(t, "mount", f.Dev, f.Mount)
}

// Tmpfs mounts a small tmpfs on dir, an existing directory; t.Cleanup
// unmounts it. It stands for a filesystem mounted inside a tree that code
// under test must not cross into.
func Tmpfs(t testing.TB, dir string) {
	t.Helper()
	RequireRoot(t)
	run(t, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", dir)
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
}

// Failing mounts on mnt (which it makes) an ext4 filesystem whose
// writeback fails, as a failing disk's would: its 256 MiB image is sparse,
// on a tmpfs of 24 MiB, so once the loop device has written that much
// every further write fails and the next flushes report EIO or ENOSPC.
// Without a journal and with errors=continue it stays writable (a
// journal's abort would turn it read-only). This kernel has no
// device-mapper or block fault injection.
func Failing(t testing.TB, mnt string) {
	t.Helper()
	RequireRoot(t)
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skipf("mkfs.ext4 not installed: %v", err)
	}
	dir := t.TempDir()
	back := filepath.Join(dir, "back")
	for _, d := range []string{back, mnt} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	run(t, "mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", back)
	t.Cleanup(func() { exec.Command("umount", "-l", back).Run() })
	img := filepath.Join(back, "img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 256<<20); err != nil {
		t.Fatal(err)
	}
	run(t, "mkfs.ext4", "-q", "-F", "-O", "^has_journal", img)
	dev := strings.TrimSpace(run(t, "losetup", "--find", "--show", img))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	run(t, "mount", "-o", "errors=continue", dev, mnt)
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// String names the filesystem for test logs.
func (f *FS) String() string { return fmt.Sprintf("%s on %s", f.Mount, f.Dev) }
