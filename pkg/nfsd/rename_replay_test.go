package nfsd

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/duet-ha/duet/pkg/nfsclient"
)

// TestFailedRenameOverDirectoryKeepsHandles: a RENAME of a over the
// non-empty directory b fails; its record is in the index log before the
// rename, and the records that take it back after. Replayed (a failover,
// a restart), the move dropped b and everything under it, and the records
// put back b alone: b/f's handle was stale on the survivor though b/f
// never moved (a review, forty-second session; failed on 7f8fbb8). Also
// when the log ends with the move (the server died before the rename, and
// the records that take it back were never written): the survivor's
// settleMove puts it back whole.
func TestFailedRenameOverDirectoryKeepsHandles(t *testing.T) {
	for _, crashed := range []bool{false, true} {
		name := "failed"
		if crashed {
			name = "died before the rename"
		}
		t.Run(name, func(t *testing.T) {
			primary := t.TempDir()
			addr, stop := serve(t, primary, Fsync{})
			c := dialNFS(t, addr)
			root := c.mount("/")
			_, st := c.mkdir(root, "a")
			mustOK(t, "MKDIR a", st)
			b, st := c.mkdir(root, "b")
			mustOK(t, "MKDIR b", st)
			f, st := c.create(b, "f")
			mustOK(t, "CREATE b/f", st)
			_, st = c.write(f, 0, []byte("data"), nfsclient.FileSync)
			mustOK(t, "WRITE b/f", st)
			if st := c.rename(root, "a", root, "b"); st == 0 {
				t.Fatal("RENAME a over the non-empty b succeeded")
			}
			if _, st := c.getattr(f); st != 0 {
				t.Fatalf("b/f on the same server after the failed RENAME: status %d", st)
			}
			stop()
			if crashed {
				cutAfterLastMove(t, primary)
			}
			survivor := t.TempDir()
			copyTree(t, primary, survivor) // the peer's copy: same paths and index
			addr2, _ := serve(t, survivor, Fsync{})
			c.point(addr2)
			if _, st := c.getattr(b); st != 0 {
				t.Errorf("b's handle on the survivor: status %d", st)
			}
			if _, st := c.getattr(f); st != 0 {
				t.Errorf("b/f's handle on the survivor: status %d (70: stale), though b/f never moved", st)
			}
		})
	}
}

// cutAfterLastMove cuts the export's index log after its last rename
// record: what a server that died between the record and the rename left.
func cutAfterLastMove(t *testing.T, export string) {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(export, indexDir))
	if err != nil {
		t.Fatal(err)
	}
	var path string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), filePrefix) {
			path = filepath.Join(export, indexDir, e.Name())
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	recs, valid := decodeAll(b)
	cut := -1
	for i, r := range recs {
		if r.kind == kindMove {
			cut = i
		}
	}
	if cut < 0 || valid != len(b) {
		t.Fatalf("index log %s: %d records, last rename at %d, %d of %d bytes valid", path, len(recs), cut, valid, len(b))
	}
	var out []byte
	for _, r := range recs[:cut+1] {
		out = r.encode(out)
	}
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
}
