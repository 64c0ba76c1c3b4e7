package replica

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestOlderPrimaryRefusedByNewerCopy: a primary whose cluster epoch is
// older than the replica's copy, which the replica's node does not count
// stale, is refused at the handshake (Server.Admit): its resync would
// replace what the replica's own term acknowledged before the heartbeats
// settle which copy is the reference (a primary resumed after a stall,
// whose peer took over and then restarted: cluster's
// TestResumedPrimaryServesOverNewerPeer). Before, every replica took any
// primary's stream, and the resumed primary's comparison rewrote the
// newer copy at once. Once the node admits it (its copy stale), the
// same primary resyncs it: the test sees a resync when there is one.
func TestOlderPrimaryRefusedByNewerCopy(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	top := t.TempDir()
	src := filepath.Join(top, "a", "data")
	state := filepath.Join(top, "b", "state")
	data := filepath.Join(top, "b", "data")
	for _, d := range []string{src, state, data, filepath.Join(top, "a", "state")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(p, s string) {
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(src, "f"), "the resumed primary's older copy")
	write(filepath.Join(data, "f"), "written and acknowledged in the replica's newer term")
	write(filepath.Join(data, "acked"), "acknowledged by the replica's term alone")

	ms, err := OpenMeta(state, "data")
	if err != nil {
		t.Fatal(err)
	}
	var newerStale atomic.Bool // the replica's node counts its copy stale
	var asked atomic.Uint64    // the epoch the last hello carried
	s := &Server{Link: testLink, StateDir: state, Dirs: []Dir{{Name: "data", Path: data}}, Log: quiet,
		Metas: map[string]*MetaStore{"data": ms}}
	s.Admit = func(epoch uint64) string {
		asked.Store(epoch)
		if epoch < 9<<8|2 && !newerStale.Load() {
			return fmt.Sprintf("this copy (epoch %d) is newer than the sender's (epoch %d)", 9<<8|2, epoch)
		}
		return ""
	}
	s.SetAccept(true)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); s.Serve(ctx, ln) }()
	defer func() {
		cancel()
		wg.Wait()
		s.Close(10 * time.Second)
		for _, rs := range s.replicas {
			rs.file.Close()
		}
	}()

	pms, err := OpenMeta(filepath.Join(top, "a", "state"), "data")
	if err != nil {
		t.Fatal(err)
	}
	p, err := NewPrimary(Dir{Name: "data", Path: src}, ln.Addr().String(), testLink, 0, quiet)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.BeginTerm(Term{Meta: pms, DirtyPath: filepath.Join(top, "a", "state", "bitmap-data")}); err != nil {
		t.Fatal(err)
	}
	p.Epoch = func() uint64 { return 5<<8 | 1 } // PRIM -> ALONE: nextEpoch(1) of 4<<8|1
	pctx, pcancel := context.WithCancel(context.Background())
	var pwg sync.WaitGroup
	pwg.Add(1)
	go func() { defer pwg.Done(); p.Run(pctx, nil) }()
	defer func() { pcancel(); pwg.Wait() }()

	// Refused, for as long as the replica's node says so.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(p.Status().LastError, "is newer than the sender's") {
		if time.Now().After(deadline) {
			t.Fatalf("the primary was not refused; its status: %+v", p.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := asked.Load(); got != 5<<8|1 {
		t.Fatalf("the hello carried epoch %d, want %d", got, 5<<8|1)
	}
	time.Sleep(1500 * time.Millisecond) // a retry or two
	for name, want := range map[string]string{"f": "written and acknowledged in the replica's newer term", "acked": "acknowledged by the replica's term alone"} {
		b, err := os.ReadFile(filepath.Join(data, name))
		if err != nil || string(b) != want {
			t.Fatalf("the replica's newer copy was rewritten by an older primary: %s holds %q, %v", name, b, err)
		}
	}

	// The node counts its copy stale (it heard the primary stays the
	// reference): the same primary resyncs it.
	newerStale.Store(true)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		b, _ := os.ReadFile(filepath.Join(data, "f"))
		_, err := os.Lstat(filepath.Join(data, "acked"))
		if string(b) == "the resumed primary's older copy" && os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("admitted, the primary did not resync the replica: f %q; status %+v", b, p.Status())
		}
	}
}
