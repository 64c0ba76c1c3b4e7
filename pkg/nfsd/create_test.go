package nfsd

import (
	"context"
	"strings"
	"testing"

	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/nfsclient"
	nfs "github.com/willscott/go-nfs"
)

// TestCreateAgainKeepsData checks that a CREATE of a name that exists
// does not empty the file: an UNCHECKED one (Linux's open(O_CREAT) when
// another client created the name first, or any CREATE sent again after
// its first attempt ran and the client wrote) opens it as it is; a
// GUARDED one fails with EXIST. Before, go-nfs's create went through
// billy's Create, which truncates: committed data was lost.
func TestCreateAgainKeepsData(t *testing.T) {
	addr, _ := serve(t, t.TempDir(), &countingSyncer{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	f, st := c.create(root, "f")
	mustOK(t, "CREATE f", st)
	if _, st := c.write(f, 0, []byte("committed"), nfsclient.Unstable); st != nfsclient.StatusOK {
		t.Fatalf("WRITE f: status %d", st)
	}
	mustOK(t, "COMMIT f", c.commit(f))

	again, st := c.create(root, "f")
	mustOK(t, "CREATE f again (UNCHECKED)", st)
	if string(again) != string(f) {
		t.Errorf("CREATE f again: another handle")
	}
	if got, st := c.read(f, 0, 100); st != nfsclient.StatusOK || string(got) != "committed" {
		t.Errorf("after an UNCHECKED CREATE of the existing f: READ status %d, %q; want %q", st, got, "committed")
	}

	_, st = call(c, func(ctx context.Context) ([]byte, error) {
		return c.c.Create(ctx, root, "f", nfsclient.Guarded, 0o644)
	})
	if st != nfsclient.StatusExist {
		t.Errorf("GUARDED CREATE of the existing f: status %d, want EXIST (%d)", st, nfsclient.StatusExist)
	}
	if got, st := c.read(f, 0, 100); st != nfsclient.StatusOK || string(got) != "committed" {
		t.Errorf("after a GUARDED CREATE of the existing f: READ status %d, %q; want %q", st, got, "committed")
	}
}

// TestChangeErrorsKeepTheirStatus: go-nfs answers NFS3ERR_IO for every
// error of a RENAME or RMDIR but ENOENT and EACCES, and ACCES for every
// error of a CREATE, MKDIR or SYMLINK, so that a RENAME over a non-empty
// directory, an RMDIR of one or a directory renamed over a file said
// "Input/output error" on the client (`mv`, `rmdir`), and a file made on a
// full filesystem "Permission denied". The proxy answers the status of
// the errno instead; a real EACCES stays ACCES.
func TestChangeErrorsKeepTheirStatus(t *testing.T) {
	dir := t.TempDir()
	loopfs.Tmpfs(t, dir) // 1 MiB
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	_, st := c.mkdir(root, "a")
	mustOK(t, "MKDIR a", st)
	b, st := c.mkdir(root, "b")
	mustOK(t, "MKDIR b", st)
	_, st = c.create(b, "f")
	mustOK(t, "CREATE b/f", st)
	_, st = c.create(root, "file")
	mustOK(t, "CREATE file", st)
	for _, tc := range []struct {
		name string
		got  uint32
		want nfs.NFSStatus
	}{
		{"RENAME a over the non-empty b", c.rename(root, "a", root, "b"), nfs.NFSStatusNotEmpty},
		{"RMDIR of the non-empty b", c.status(func(ctx context.Context) error { return c.c.Rmdir(ctx, root, "b") }), nfs.NFSStatusNotEmpty},
		{"RENAME the directory a over the file", c.rename(root, "a", root, "file"), nfs.NFSStatusNotDir},
	} {
		if tc.got != uint32(tc.want) {
			t.Errorf("%s: status %d, want %d (%s)", tc.name, tc.got, tc.want, tc.want)
		}
	}
	// A caller without write permission on a directory still gets ACCES.
	ro, st := c.mkdir(root, "ro")
	mustOK(t, "MKDIR ro", st)
	mode := uint32(0o555)
	mustOK(t, "SETATTR ro", c.status(func(ctx context.Context) error { return c.c.Setattr(ctx, ro, nfsclient.SetAttr{Mode: &mode}) }))
	user := dialAs(t, addr, nfsclient.Cred{UID: 1000, GID: 1000})
	if _, st := user.create(ro, "x"); st != uint32(nfs.NFSStatusAccess) {
		t.Errorf("CREATE in a directory the caller may not write: status %d, want ACCES", st)
	}
	// The tmpfs fills (go-nfs maps a WRITE's errors itself), then a
	// SYMLINK whose target needs a page of its own says NOSPC.
	f, st := c.create(root, "big")
	mustOK(t, "CREATE big", st)
	fill(t, c, f)
	target := strings.Repeat("t", 1000)
	if _, st := c.symlink(root, "l", target); st != uint32(nfs.NFSStatusNoSPC) {
		t.Errorf("SYMLINK on a full filesystem: status %d, want NOSPC (%d)", st, nfs.NFSStatusNoSPC)
	}
}

// fill makes FILE_SYNC WRITEs to f until its filesystem, a 1 MiB tmpfs,
// is full.
func fill(t *testing.T, c *client, f []byte) {
	t.Helper()
	chunk := make([]byte, 256<<10)
	for i := range 16 {
		if _, st := c.write(f, uint64(i*len(chunk)), chunk, nfsclient.FileSync); st != nfsclient.StatusOK {
			return
		}
	}
	t.Fatal("4 MiB written to a 1 MiB tmpfs")
}
