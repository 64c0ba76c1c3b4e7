package nfsd

import (
	"context"
	"testing"

	"github.com/duet-ha/duet/pkg/nfsclient"
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
