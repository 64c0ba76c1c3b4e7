package replica

import (
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"github.com/duet-ha/duet/pkg/loopfs"
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
		got, ok := generation(int(d.Fd()), "f")
		if !ok || got != want {
			t.Fatalf("generation from the handle: %#x (found %v), want i_generation %#x", got, ok, want)
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

func TestHandleGeneration(t *testing.T) {
	for _, tc := range []struct {
		typ  int32
		b    []byte
		want uint32
		ok   bool
	}{
		{1, []byte{0x0c, 0, 0, 0, 0x78, 0x56, 0x34, 0x12}, 0x12345678, true},
		{2, []byte{0x0c, 0, 0, 0, 0x78, 0x56, 0x34, 0x12, 2, 0, 0, 0, 0, 0, 0, 0}, 0x12345678, true},
		{0x81, []byte{0x83, 0, 0, 0, 0, 0, 0, 0, 0xe3, 0xfa, 0x20, 0x8e}, 0x8e20fae3, true},
		{0x82, []byte{0x83, 0, 0, 0, 0, 0, 0, 0, 0xe3, 0xfa, 0x20, 0x8e, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0}, 0x8e20fae3, true},
		{0x81, []byte{0x83, 0, 0, 0, 0, 0, 0, 0}, 0, false}, // short
		{0x4d, []byte{1, 1, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0x0b, 0, 0, 0}, 0x0b, true},
		{0x4e, []byte{1, 1, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0x0b, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0}, 0x0b, true},
		{0x4d, make([]byte, 16), 0, false}, // short
	} {
		got, ok := handleGeneration(tc.typ, tc.b)
		if got != tc.want || ok != tc.ok {
			t.Errorf("handleGeneration(%#x, % x) = %#x, %v; want %#x, %v", tc.typ, tc.b, got, ok, tc.want, tc.ok)
		}
	}
}
