package capture

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"

	"github.com/duet-ha/duet/pkg/loopfs"
)

// From a second review (forty-first session) of d0aac90.

// TestCaptureOverlayModuleLoadedAfterOpen: overlay_real_inode picks the
// layout of an overlay file's private_data with
// bpf_core_type_exists(struct ovl_file), resolved once, when the programs
// are loaded, against vmlinux and the modules loaded then. Where overlay
// is a module (most distributions' kernels) that is not loaded yet when
// the daemon starts (the first container starts later, and mounting
// overlayfs loads it), struct ovl_file is not found and private_data
// (a struct ovl_file on Linux 6.13 and later) is read as the real struct
// file: f_inode is read from past the 16-byte ovl_file, watched() fails,
// and no shared mapping made through overlayfs is ever reported until the
// daemon restarts. Runs only on a kernel with overlay as an unloaded
// module; here (overlay built in) the same outcome was reproduced by
// compiling the check as false: TestCaptureSharedMappingThroughOverlay
// failed on ext4, XFS and btrfs, and 200 of 200 mappings of
// TestCaptureOverlayMmapWhileOtherThreadsMap went unreported.
func TestCaptureOverlayModuleLoadedAfterOpen(t *testing.T) {
	loopfs.RequireRoot(t)
	k, err := btf.LoadKernelSpec()
	if err != nil {
		t.Skip(err)
	}
	if _, err := k.AnyTypeByName("ovl_file"); err == nil {
		t.Skip("overlay is built in: struct ovl_file is in vmlinux's BTF")
	}
	if _, err := os.Stat("/sys/module/overlay"); err == nil {
		if exec.Command("modprobe", "-r", "overlay").Run() != nil {
			t.Skip("overlay is loaded and cannot be unloaded")
		}
	}
	fs := loopfs.Make(t, "btrfs", 256)
	c := openOn(t, "btrfs", fs.Mount) // overlay not loaded: no struct ovl_file
	rec := newRecorder(c)
	merged := overlayOver(t, fs.Mount) // loads the module
	if _, err := k.AnyTypeByName("ovl_file"); err != nil {
		if _, err := os.Stat("/sys/kernel/btf/overlay"); err != nil {
			t.Skip("no module BTF for overlay")
		}
	}
	f, err := os.OpenFile(filepath.Join(merged, "f"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(make([]byte, 256<<10), 0); err != nil {
		t.Fatal(err)
	}
	ino := inoOf(t, filepath.Join(fs.Mount, "upper", "f"))
	settle(t, c, rec)
	m, err := unix.Mmap(int(f.Fd()), 0, 256<<10, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	if recs := settle(t, c, rec); !covers(recs, ino, KindMmap, 0, 256<<10) {
		t.Fatalf("overlay loaded after the capture: a shared mapping through overlayfs not reported; records: %v", recs)
	}
}
