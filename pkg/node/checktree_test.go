package node

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/duet-ha/duet/pkg/loopfs"
)

// TestCheckTreeFilesystems: ext4, XFS and btrfs are replicated (XFS and
// btrfs with their capture hooks required); tmpfs is refused at start with
// an error naming the directory and the filesystems that work, not
// replicated with changes capture never sees.
func TestCheckTreeFilesystems(t *testing.T) {
	for _, tc := range []struct {
		fstype    string
		mib       int
		wantXFS   bool
		wantBtrfs bool
		refused   string
	}{
		{"ext4", 64, false, false, ""},
		{"xfs", 320, true, false, ""},
		{"btrfs", 128, false, true, ""},
		{"tmpfs", 0, false, false, "filesystem type 0x1021994 is not supported"},
	} {
		t.Run(tc.fstype, func(t *testing.T) {
			var dir string
			if tc.fstype == "tmpfs" {
				dir = t.TempDir()
				loopfs.Tmpfs(t, dir)
			} else {
				dir = loopfs.Make(t, tc.fstype, tc.mib).Mount
			}
			tr, err := checkTree(0, dir)
			if tc.refused != "" {
				if err == nil || !strings.Contains(err.Error(), tc.refused) || !strings.Contains(err.Error(), "ext4, XFS and btrfs") {
					t.Fatalf("checkTree on %s: %v, want an error saying %q and naming ext4, XFS and btrfs", tc.fstype, err, tc.refused)
				}
				return
			}
			if err != nil || tr.dev == 0 || tr.xfs != tc.wantXFS || (tr.btrfs != 0) != tc.wantBtrfs {
				t.Fatalf("checkTree on %s: %+v err %v, want a device, xfs %v, btrfs superblock %v", tc.fstype, tr, err, tc.wantXFS, tc.wantBtrfs)
			}
			// On btrfs the superblock's device is not the one stat(2)
			// reports: capture filters by the first and reports the
			// second.
			if tc.wantBtrfs && tr.btrfs == tr.dev {
				t.Fatalf("checkTree on btrfs: superblock device %#x is the directory's", tr.btrfs)
			}
		})
	}
}

// TestCheckTreeBtrfsSubvolume: a btrfs subvolume (or snapshot) inside a
// replicated directory has its own device and inode numbers, which
// capture does not follow: the directory is refused at start, naming the
// subvolume, whatever its depth. One beside the directory is no concern.
func TestCheckTreeBtrfsSubvolume(t *testing.T) {
	if _, err := exec.LookPath("btrfs"); err != nil {
		t.Skipf("btrfs (btrfs-progs) not installed: %v", err)
	}
	fs := loopfs.Make(t, "btrfs", 128)
	dir := filepath.Join(fs.Mount, "data")
	if err := os.MkdirAll(filepath.Join(dir, "a", "b"), 0o755); err != nil {
		t.Fatal(err)
	}
	subvol := func(path string) {
		t.Helper()
		if out, err := exec.Command("btrfs", "subvolume", "create", path).CombinedOutput(); err != nil {
			t.Fatalf("btrfs subvolume create %s: %v\n%s", path, err, out)
		}
	}
	subvol(filepath.Join(fs.Mount, "beside"))
	if _, err := checkTree(0, dir); err != nil {
		t.Fatalf("a subvolume beside the directory: %v", err)
	}
	subvol(filepath.Join(dir, "a", "b", "inside"))
	_, err := checkTree(0, dir)
	if err == nil || !strings.Contains(err.Error(), "holds btrfs subvolume") || !strings.Contains(err.Error(), "./a/b/") {
		t.Fatalf("a subvolume in a/b of the directory: %v, want it refused, naming where", err)
	}
	// The subvolume itself is a directory that can be replicated.
	if _, err := checkTree(0, filepath.Join(dir, "a", "b", "inside")); err != nil {
		t.Fatalf("the subvolume as a replicated directory: %v", err)
	}
}

// A sync directory whose writes the kernel makes durable on return (a
// filesystem mounted -o sync or -o dirsync, a directory flagged chattr +S or +D, which
// ext4 hands on to what is made in it) would tell applications "durable"
// before the peer has the data: syncTree names it, and the daemon refuses
// to start on it (Run's check, beside checkTree's).
func TestSyncTreeNamed(t *testing.T) {
	loopfs.RequireRoot(t)
	fs := loopfs.Make(t, "ext4", 64)
	dir := filepath.Join(fs.Mount, "d")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if why := syncTree(dir); why != "" {
		t.Fatalf("a plain directory: %q", why)
	}
	for _, c := range []struct{ flag, want string }{{"+S", "chattr +S"}, {"+D", "chattr +D"}} {
		if out, err := exec.Command("chattr", c.flag, dir).CombinedOutput(); err != nil {
			t.Fatalf("chattr %s: %v %s", c.flag, err, out)
		}
		if why := syncTree(dir); !strings.Contains(why, c.want) {
			t.Errorf("chattr %s: %q, want it named", c.flag, why)
		}
		exec.Command("chattr", "-S", "-D", dir).Run()
	}
	// (A remount does not set dirsync: mounted again.)
	if out, err := exec.Command("umount", fs.Mount).CombinedOutput(); err != nil {
		t.Fatalf("umount: %v %s", err, out)
	}
	if out, err := exec.Command("mount", "-o", "dirsync", fs.Dev, fs.Mount).CombinedOutput(); err != nil {
		t.Fatalf("mount -o dirsync: %v %s", err, out)
	}
	if why := syncTree(dir); !strings.Contains(why, "-o dirsync") {
		t.Errorf("mounted -o dirsync: %q, want it named", why)
	}
	if out, err := exec.Command("mount", "-o", "remount,sync", fs.Mount).CombinedOutput(); err != nil {
		t.Fatalf("remount sync: %v %s", err, out)
	}
	if why := syncTree(dir); !strings.Contains(why, "-o sync") {
		t.Errorf("mounted -o sync: %q, want it named", why)
	}
}
