package capture

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/duet-ha/duet/pkg/loopfs"
)

// TestCaptureRangeLockPreopReleasedByInodeUpdate: a btrfs range operation
// inside a syscall whose exit is hooked (here a punch through overlayfs)
// is reported at its range lock as a preop (hook 34), which the journal
// holds until the inode's next update (or PreopTimeout, 1 s: a durability
// call waits for it). The inode update must be reported after the preop
// even when the inode's mark is set by an earlier change userspace has not
// read yet: the preop clears it, as the other preop hooks do. Before, the
// mark hid the update and every such call waited the full second.
func TestCaptureRangeLockPreopReleasedByInodeUpdate(t *testing.T) {
	fs := loopfs.Make(t, "btrfs", 256)
	c := openOn(t, "btrfs", fs.Mount)
	rec := newRecorder(c)
	merged := overlayOver(t, fs.Mount)
	f, err := os.OpenFile(filepath.Join(merged, "f"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(make([]byte, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	f.Sync()
	ino := inoOf(t, filepath.Join(fs.Mount, "upper", "f"))
	settle(t, c, rec)
	for round := range 5 { // a fresh range each round: a hole punched again locks nothing
		// An inode update userspace has not read: its mark stays set.
		if err := unix.Fchmod(int(f.Fd()), 0o600+uint32(round%2)); err != nil {
			t.Fatal(err)
		}
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(round+1)*128<<10, 64<<10); err != nil {
			t.Fatal(err)
		}
		recs := settle(t, c, rec)
		var preop uint64
		for _, r := range recs {
			if r.Ino == ino && r.Kind == KindPreop && r.Hook == 34 && preop == 0 {
				preop = r.Seq
			}
		}
		if preop == 0 {
			t.Fatalf("round %d: no preop of the range lock (hook 34) for a punch through overlayfs; records: %v", round, recs)
		}
		released := false
		for _, r := range recs {
			released = released || r.Ino == ino && r.Kind == KindAttr && r.Seq > preop
		}
		if !released {
			t.Fatalf("round %d: no inode update reported after the range lock's preop (seq %d): the journal holds it for PreopTimeout; records: %v", round, preop, recs)
		}
	}
}
