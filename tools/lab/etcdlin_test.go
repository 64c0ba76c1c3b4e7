package lab

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/tools/lab/linearize"
)

// etcdHistory records puts and gets on a few keys of kine through the VIP,
// by several clients at once, as Jepsen's etcd test does: once the faults
// are over, the history must be linearizable (tools/lab/linearize). A
// write acknowledged and then lost by a failover, or a read served from a
// stale copy, makes it fail; counting acknowledged keys would miss the
// stale read, and a key rewritten after the loss would hide the loss.
type etcdHistory struct {
	l       *Lab
	gate    *sync.RWMutex // if set, held for reading around each operation
	keys    int
	mu      sync.Mutex
	ops     []linearize.Op
	unknown int
	wg      sync.WaitGroup
}

// linKey is the etcd key of register k.
func linKey(k int) string { return fmt.Sprintf("/lin/k%d", k) }

// startEtcdHistory starts clients that each issue one operation at a time,
// a put of a value unique to the client and its count or a get, on a
// random one of keys registers, until ctx ends.
func startEtcdHistory(ctx context.Context, l *Lab, clients, keys int, seed int64, gate *sync.RWMutex) *etcdHistory {
	h := &etcdHistory{l: l, keys: keys, gate: gate}
	for c := 0; c < clients; c++ {
		rng := rand.New(rand.NewSource(seed + int64(c)))
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			h.client(ctx, c, rng)
		}()
	}
	return h
}

func (h *etcdHistory) client(ctx context.Context, id int, rng *rand.Rand) {
	for n := 0; ctx.Err() == nil; n++ {
		op := linearize.Op{Client: id, Key: linKey(rng.Intn(h.keys)), Kind: linearize.Get}
		args := []string{"etcdctl", "--endpoints", "http://" + vipAddr + ":2379", "--dial-timeout", "1s", "--command-timeout", "2s"}
		if rng.Intn(2) == 0 {
			op.Kind = linearize.Put
			op.Value = fmt.Sprintf("c%d-%d", id, n)
			args = append(args, "put", op.Key, op.Value)
		} else {
			args = append(args, "get", op.Key, "--print-value-only")
		}
		if h.gate != nil {
			h.gate.RLock()
		}
		octx, cancel := context.WithTimeout(ctx, 3*time.Second)
		op.Call = time.Now()
		out, err := h.l.ipcStdout(octx, []string{"ETCDCTL_API=3"}, args...)
		op.Return = time.Now()
		cancel()
		if h.gate != nil {
			h.gate.RUnlock()
		}
		got := strings.TrimSpace(string(out))
		switch {
		case err != nil:
			// Timed out, refused or failed: a put may or may not have
			// been carried out; a get tells nothing.
			op.Unknown = true
		case op.Kind == linearize.Put && got != "OK":
			op.Unknown = true
		case op.Kind == linearize.Get:
			op.Output = got
		}
		h.mu.Lock()
		h.ops = append(h.ops, op)
		if op.Unknown {
			h.unknown++
		}
		h.mu.Unlock()
		if op.Unknown {
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// notCommitted turns into puts of unknown outcome the acknowledged puts
// that why says were never committed (why returns the reason, or ""): an
// acknowledgement the datastore's front end gave for a write its database
// refused (kine v0.17.5 on a full disk, stackLoad.notCommitted) says
// nothing of what a failover kept. The clients must have ended.
func (h *etcdHistory) notCommitted(t *testing.T, why func(value string, at time.Time) string) {
	t.Helper()
	h.wg.Wait()
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for i := range h.ops {
		op := &h.ops[i]
		if op.Kind != linearize.Put || op.Unknown {
			continue
		}
		if reason := why(op.Value, op.Return); reason != "" {
			if n < 5 {
				t.Logf("etcd history: put %s=%s acknowledged at %s was never committed: %s", op.Key, op.Value, op.Return.Format("15:04:05.000"), reason)
			}
			op.Unknown = true
			h.unknown++
			n++
		}
	}
	if n > 0 {
		t.Logf("etcd history: %d acknowledged puts never committed, checked as puts of unknown outcome", n)
	}
}

// check waits for the clients to end (ctx must be done) and checks the
// history; a history that is not linearizable fails the test, with
// porcupine's visualization written next to the lab's logs.
func (h *etcdHistory) check(t *testing.T) {
	t.Helper()
	h.wg.Wait()
	h.mu.Lock()
	defer h.mu.Unlock()
	gets, puts := 0, 0
	for _, op := range h.ops {
		if op.Unknown {
			continue
		}
		if op.Kind == linearize.Get {
			gets++
		} else {
			puts++
		}
	}
	html := filepath.Join(os.TempDir(), fmt.Sprintf("duet-etcd-history-%d.html", time.Now().UnixNano()))
	ok, info, err := linearize.Check(h.ops, 3*time.Minute, html)
	if err != nil {
		t.Fatalf("etcd history: %v", err)
	}
	t.Logf("etcd history through the VIP: %d puts and %d gets acknowledged, %d with an unknown outcome, on %d keys: %s",
		puts, gets, h.unknown, h.keys, info)
	if !ok {
		t.Errorf("etcd history: %s", info)
	}
	if puts == 0 || gets == 0 {
		t.Errorf("etcd history: %d puts and %d gets acknowledged: nothing to check", puts, gets)
	}
}
