package node

import (
	"strings"
	"testing"

	"github.com/duet-ha/duet/pkg/loopfs"
)

// TestCheckTreeFilesystems: ext4 and XFS are replicated (XFS with its
// capture hooks required); btrfs and tmpfs are refused at start with an
// error naming the directory and the filesystems that work, not
// replicated with changes capture never sees.
func TestCheckTreeFilesystems(t *testing.T) {
	for _, tc := range []struct {
		fstype  string
		mib     int
		wantXFS bool
		refused string
	}{
		{"ext4", 64, false, ""},
		{"xfs", 320, true, ""},
		{"btrfs", 128, false, "btrfs is not supported yet"},
		{"tmpfs", 0, false, "filesystem type 0x1021994 is not supported"},
	} {
		t.Run(tc.fstype, func(t *testing.T) {
			var dir string
			if tc.fstype == "tmpfs" {
				dir = t.TempDir()
				loopfs.Tmpfs(t, dir)
			} else {
				dir = loopfs.Make(t, tc.fstype, tc.mib).Mount
			}
			dev, xfs, err := checkTree(0, dir)
			if tc.refused != "" {
				if err == nil || !strings.Contains(err.Error(), tc.refused) || !strings.Contains(err.Error(), "ext4 and XFS") {
					t.Fatalf("checkTree on %s: %v, want an error saying %q and naming ext4 and XFS", tc.fstype, err, tc.refused)
				}
				return
			}
			if err != nil || dev == 0 || xfs != tc.wantXFS {
				t.Fatalf("checkTree on %s: dev %#x xfs %v err %v, want a device, xfs %v", tc.fstype, dev, xfs, err, tc.wantXFS)
			}
		})
	}
}
