package nfsd

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/duet-ha/duet/pkg/nfsclient"
	nfs "github.com/willscott/go-nfs"
)

// TestRemoveAndRmdirKeepTheirKinds: go-nfs makes an RMDIR and a REMOVE
// the same removal, so an RMDIR of a symlink to a directory (or of a
// file) removed it, and a REMOVE of an empty directory removed the
// directory, where rmdir(2) says ENOTDIR and unlink(2) EISDIR.
func TestRemoveAndRmdirKeepTheirKinds(t *testing.T) {
	dir := t.TempDir()
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	tdir, st := c.mkdir(root, "t")
	mustOK(t, "MKDIR t", st)
	_, st = c.create(tdir, "x")
	mustOK(t, "CREATE t/x", st)
	_, st = c.symlink(root, "l", "t")
	mustOK(t, "SYMLINK l -> t", st)
	_, st = c.create(root, "f")
	mustOK(t, "CREATE f", st)
	_, st = c.mkdir(root, "d")
	mustOK(t, "MKDIR d", st)
	rmdir := func(name string) uint32 {
		return c.status(func(ctx context.Context) error { return c.c.Rmdir(ctx, root, name) })
	}
	for _, tc := range []struct {
		what string
		got  uint32
		want nfs.NFSStatus
		kept string
	}{
		{"RMDIR of the symlink l to a directory", rmdir("l"), nfs.NFSStatusNotDir, "l"},
		{"RMDIR of the file f", rmdir("f"), nfs.NFSStatusNotDir, "f"},
		{"REMOVE of the empty directory d", c.remove(root, "d"), nfs.NFSStatusIsDir, "d"},
	} {
		if tc.got != uint32(tc.want) {
			t.Errorf("%s: status %d, want %d (%s)", tc.what, tc.got, tc.want, tc.want)
		}
		if _, err := os.Lstat(filepath.Join(dir, tc.kept)); err != nil {
			t.Errorf("after the %s: %v", tc.what, err)
		}
	}
	// What each is for still works.
	mustOK(t, "RMDIR d", rmdir("d"))
	mustOK(t, "REMOVE f", c.remove(root, "f"))
	mustOK(t, "REMOVE l", c.remove(root, "l"))
	if _, err := os.Stat(filepath.Join(dir, "t", "x")); err != nil {
		t.Errorf("t/x after the removal of the symlink to t: %v", err)
	}
	for _, name := range []string{"d", "f", "l"} {
		if _, err := os.Lstat(filepath.Join(dir, name)); !os.IsNotExist(err) {
			t.Errorf("%s still there after its removal: %v", name, err)
		}
	}
}

// TestRemoveNotPermittedIsPerm: a REMOVE that unlink(2) refuses with
// EPERM (another user's file in a sticky directory, as in /tmp) is
// answered PERM, "Operation not permitted" on the client as locally;
// go-nfs said ACCES, "Permission denied", as for a directory the caller
// may not write.
func TestRemoveNotPermittedIsPerm(t *testing.T) {
	dir := t.TempDir()
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	s, st := c.mkdir(root, "sticky")
	mustOK(t, "MKDIR sticky", st)
	if err := os.Chmod(filepath.Join(dir, "sticky"), 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	other := dialAs(t, addr, nfsclient.Cred{UID: 1001, GID: 1001})
	_, st = other.create(s, "f")
	mustOK(t, "CREATE sticky/f as 1001", st)
	user := dialAs(t, addr, nfsclient.Cred{UID: 1000, GID: 1000})
	if st := user.remove(s, "f"); st != uint32(nfs.NFSStatusPerm) {
		t.Errorf("uid 1000 REMOVE of uid 1001's file in a sticky directory: status %d, want PERM (%d)", st, nfs.NFSStatusPerm)
	}
	if _, err := os.Lstat(filepath.Join(dir, "sticky", "f")); err != nil {
		t.Errorf("sticky/f after the refused REMOVE: %v", err)
	}
	// A directory the caller may not write is still ACCES.
	if err := os.Chmod(filepath.Join(dir, "sticky"), 0o755); err != nil {
		t.Fatal(err)
	}
	if st := user.remove(s, "f"); st != uint32(nfs.NFSStatusAccess) {
		t.Errorf("uid 1000 REMOVE in a directory it may not write: status %d, want ACCES (%d)", st, nfs.NFSStatusAccess)
	}
}
