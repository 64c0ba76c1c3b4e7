package nfsd

import (
	"context"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
	nfs "github.com/willscott/go-nfs"
)

// From a review of the first version of the removal kinds (forty-fifth
// session): TestMismatchedRemovalKeepsTheHandleLive failed on
// it; TestPipelinedRemovalsKeepTheirKinds passed, and guards the kinds
// of pipelined calls.

// slowSyncer widens every sync, the index log's included, as a peer's
// round trip does.
type slowSyncer struct{}

func (slowSyncer) Sync(f *os.File) error {
	time.Sleep(20 * time.Millisecond)
	return f.Sync()
}

// TestMismatchedRemovalKeepsTheHandleLive: a REMOVE of a directory or an
// RMDIR of a file cannot succeed (unlink(2) never removes a directory,
// rmdir(2) never anything else), yet its ID was taken back durably and
// put back after the kernel's refusal: another client's GETATTR of the
// live directory or file in between was answered STALE, and a client
// drops a STALE handle for good.
func TestMismatchedRemovalKeepsTheHandleLive(t *testing.T) {
	dir := t.TempDir()
	addr, _ := serve(t, dir, slowSyncer{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	d, st := c.mkdir(root, "d")
	mustOK(t, "MKDIR d", st)
	f, st := c.create(root, "f")
	mustOK(t, "CREATE f", st)

	reader := dialNFS(t, addr)
	done := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	stale := map[string]int{}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			for name, fh := range map[string][]byte{"d": d, "f": f} {
				if _, st := reader.getattr(fh); st == nfsclient.StatusStale {
					mu.Lock()
					stale[name]++
					mu.Unlock()
				}
			}
		}
	}()
	for i := 0; i < 10; i++ {
		if st := c.remove(root, "d"); st != uint32(nfs.NFSStatusIsDir) {
			t.Errorf("REMOVE d: status %d, want ISDIR", st)
		}
		if st := c.status(func(ctx context.Context) error { return c.c.Rmdir(ctx, root, "f") }); st != uint32(nfs.NFSStatusNotDir) {
			t.Errorf("RMDIR f: status %d, want NOTDIR", st)
		}
	}
	close(done)
	wg.Wait()
	for name, n := range stale {
		t.Errorf("GETATTR of the live %s answered STALE %d times during refused removals of the wrong kind", name, n)
	}
}

// TestPipelinedRemovalsKeepTheirKinds: REMOVEs and RMDIRs sent at once,
// interleaved with calls go-nfs answers without a removal (GETATTR, and
// a REMOVE answered from the reply cache), each keep their own kind.
func TestPipelinedRemovalsKeepTheirKinds(t *testing.T) {
	dir := t.TempDir()
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	for i := range 20 {
		_, st := c.mkdir(root, "d"+string(rune('a'+i)))
		mustOK(t, "MKDIR", st)
		_, st = c.create(root, "f"+string(rune('a'+i)))
		mustOK(t, "CREATE", st)
	}
	conn := rawConn(t, addr)
	var calls []byte
	want := map[uint32]uint32{}
	xid := uint32(5000)
	add := func(proc uint32, name string, st nfs.NFSStatus) {
		calls = append(calls, rpcCall(xid, proc, dirop(root, name))...)
		want[xid] = uint32(st)
		xid++
	}
	for i := range 20 {
		d, f := "d"+string(rune('a'+i)), "f"+string(rune('a'+i))
		add(procRemove, d, nfs.NFSStatusIsDir)
		add(procRmdir, f, nfs.NFSStatusNotDir)
		calls = append(calls, rpcCall(xid, 1 /* GETATTR */, xdrOpaque(root))...)
		want[xid] = 0
		xid++
		add(procRmdir, d, nfs.NFSStatusOk)
		add(procRemove, f, nfs.NFSStatusOk)
	}
	if _, err := conn.Write(calls); err != nil {
		t.Fatal(err)
	}
	for range want {
		x, st := replyStatus(replyBody(t, conn))
		if st != want[x] {
			t.Errorf("XID %d: status %d, want %d", x, st, want[x])
		}
	}
}
