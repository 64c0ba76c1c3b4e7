package replica

import (
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/duet-ha/duet/pkg/wire"
)

// TestDistrustSurvivesRestart: a flush of the replica fails (EIO), so
// its progress must be forgotten (distrust: session 0, a resync). Two
// ways the forgetting never reaches the state file, and the restarted
// daemon (same boot) welcomes the primary with the old session and
// applied batch: the primary resumes, the new daemon's first syncfs
// succeeds (Linux reported the writeback error once, to the dead
// daemon) and batch 1, whose pages may be lost, is acknowledged durable.
//
//   - savefail: distrust's own save fails (the state directory is full
//     or failing: the same disk that could not flush);
//   - kill: the daemon is killed after the failed flush and before
//     distrust's save, while it flushes again in the connection's
//     deferred sync (or waits for a background sync) first.
func TestDistrustSurvivesRestart(t *testing.T) {
	for _, mode := range []string{"savefail", "kill"} {
		t.Run(mode, func(t *testing.T) {
			stateDir := filepath.Join(t.TempDir(), "state")
			s := newTestSecondary(t, stateDir)
			r, err := s.state("data")
			if err != nil {
				t.Fatal(err)
			}
			killed := make(chan struct{}) // the blocked "dead" daemon
			t.Cleanup(func() { close(killed) })
			var mu sync.Mutex
			calls := 0
			var rw *os.File
			s.syncfs = func(fd int) error {
				mu.Lock()
				calls++
				n := calls
				mu.Unlock()
				if n == 1 {
					if mode == "savefail" {
						// Called holding r.mu: saves fail from now on.
						ro, err := os.Open(r.file.Name())
						if err != nil {
							t.Error(err)
						}
						rw, r.file = r.file, ro
					}
					return syscall.EIO
				}
				if mode == "kill" {
					<-killed // the daemon dies here
				}
				return nil
			}
			p := s.connect(t, 7)
			p.batch(1,
				wire.Op{Code: wire.OpCreate, Path: "f", Mode: 0o644},
				wire.Op{Code: wire.OpWrite, Path: "f", Data: []byte("pages lost by writeback")})
			p.ack(1, 0)
			p.send(&wire.Frame{Type: wire.TypeSync, Seq: 1})
			if f, err := p.read(); err != nil || f.Type != wire.TypeError {
				t.Fatalf("sync: got %s %q (%v), want a refusal", f.Type, f.Payload, err)
			}
			p.c.Close()
			if mode == "savefail" {
				r.mu.Lock() // the connection is done (distrust ran)
				rw.Close()
				r.mu.Unlock()
			}
			// The daemon restarts (same boot): a new Server reads the file.
			s2 := newTestSecondary(t, stateDir)
			p = s2.connect(t, 7)
			if p.w.Session == 7 && p.w.Applied >= 1 {
				p.send(&wire.Frame{Type: wire.TypeSync, Seq: 1})
				f, _ := p.read()
				t.Fatalf("after a failed flush and a restart the welcome says session %d applied %d (the primary resumes; the sync after it answered %s seq %d flags %#x): want a forgotten progress (session 0)",
					p.w.Session, p.w.Applied, f.Type, f.Seq, f.Flags)
			}
		})
	}
}
