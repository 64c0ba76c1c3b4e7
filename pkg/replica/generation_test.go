package replica

import (
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// fsIocGetversion is FS_IOC_GETVERSION, _IOR('v', 1, long): i_generation.
const fsIocGetversion = 0x80087601

// TestGenerationFromHandle: the builder tells a reused inode number from a
// renamed file by i_generation, read from the file handle. On XFS the
// handle holds a 64-bit inode number (type 0x81, on any size of
// filesystem); read as ext4's it gave no generation, and a new file taking
// a deleted one's number was shipped as a rename of it. btrfs's holds the
// subvolume too.
func TestGenerationFromHandle(t *testing.T) {
	onEachFS(t, func(t *testing.T, dir string) {
		f, err := os.Create(filepath.Join(dir, "f"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		var want uint32
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocGetversion, uintptr(unsafe.Pointer(&want))); errno != 0 {
			t.Fatalf("FS_IOC_GETVERSION: %v", errno)
		}
		d, err := os.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		_, got, ok := fstree.Generation(int(d.Fd()), "f")
		if !ok || got != want {
			t.Fatalf("generation from the handle: %#x (found %v), want i_generation %#x", got, ok, want)
		}
		// The scan that builds the primary's shadow reads them too.
		root, err := fstree.OpenRoot(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer root.Close()
		var listed []wire.Entry
		if _, err := fstree.WalkGens(root, false, func(e *wire.Entry) error {
			listed = append(listed, *e)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		var found bool
		for _, e := range listed {
			if e.Flags&wire.EntryGen == 0 {
				t.Errorf("%s listed without its generation", e.Path)
			}
			if e.Path == "f" {
				found = true
				if e.Gen != want {
					t.Errorf("f listed with generation %#x, want %#x", e.Gen, want)
				}
			}
		}
		if !found {
			t.Errorf("f not listed: %v", listed)
		}
	})
}

// onEachFS runs fn as a subtest on a fresh loop filesystem (mounted on
// dir) of each kind duet replicates: each has its own file handles.
func onEachFS(t *testing.T, fn func(t *testing.T, dir string)) {
	for _, fs := range []struct {
		fstype string
		mib    int
	}{{"ext4", 64}, {"xfs", 320}, {"btrfs", 128}} {
		t.Run(fs.fstype, func(t *testing.T) { fn(t, loopfs.Make(t, fs.fstype, fs.mib).Mount) })
	}
}
