package nfsd

import (
	"os"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// armedSyncer syncs; once armed, the next sync of a directory calls
// onDir(err) with its result.
type armedSyncer struct {
	armed atomic.Bool
	fail  bool // the armed directory sync fails (ENOSYS: duet's supervisor gone)
	onDir func()
}

func (s *armedSyncer) Sync(f *os.File) error {
	fi, err := f.Stat()
	if err != nil || !fi.IsDir() || !s.armed.CompareAndSwap(true, false) {
		return f.Sync()
	}
	if s.fail {
		return unix.ENOSYS
	}
	err = f.Sync()
	if s.onDir != nil {
		s.onDir()
	}
	return err
}

// TestSettleMoveAfterRecreatedSource: settleMove undoes a log's last
// rename whenever the rename's source name exists. A rename that was done
// and synced was still the last record while the next CREATE (or MKDIR,
// SYMLINK) of that same name ran: its object exists, and its directory is
// durable, before its index record is appended. A primary that crashed in
// between (or whose directory sync failed, or whose index append failed on
// a full disk) left the peer a log ending in the move and the source name
// present: the peer's server "undid" the rename that was done. The handle
// of the renamed file then named the new, empty file at the old name, and
// the handle of the file the rename replaced (and removed) named the
// renamed file: after the failover, reads and writes through both handles
// reached the wrong files. The pattern is the atomic save: write tmp,
// rename tmp over x, create tmp again.
func TestSettleMoveAfterRecreatedSource(t *testing.T) {
	for _, tc := range []struct {
		name    string
		fail    bool
		restart bool // the server restarts between the rename and the create
	}{{"crash after the create's directory sync", false, false}, {"the create's directory sync fails", true, false},
		{"restarted after the rename, crash after the create", false, true}} {
		t.Run(tc.name, func(t *testing.T) {
			dir, peer := t.TempDir(), t.TempDir()
			s := &armedSyncer{fail: tc.fail}
			// What the peer holds if the primary dies now: everything
			// synced so far.
			s.onDir = func() { copyTree(t, dir, peer) }
			h := open(t, dir, s)
			htmp := put(t, h, "tmp", "new")
			hx := put(t, h, "x", "old")
			if err := h.fs.Rename("tmp", "x"); err != nil {
				t.Fatal(err)
			}
			resolvesTo(t, h, "after the rename", htmp, "x", "new")
			isStale(t, h, "after the rename", hx)
			if tc.restart {
				h.Close()
				h = open(t, dir, s)
			}
			s.armed.Store(true)
			f, err := h.fs.Create("tmp")
			if err == nil {
				f.Close()
			}
			h.Close()
			if tc.fail {
				peer = dir // the server restarts, or the peer got the same
			}
			h = open(t, peer, Fsync{})
			defer h.Close()
			resolvesTo(t, h, "after the failover", htmp, "x", "new")
			isStale(t, h, "after the failover", hx)
		})
	}
}
