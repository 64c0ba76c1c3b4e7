package nfsd

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// heapNow is the live heap after a collection.
func heapNow() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// TestStalledReadHoldsMemory: a client makes a sparse file of 16 MiB
// (CREATE, then SETATTR size: no data sent), then on each of a few
// connections sends one READ of 16 MiB and never reads the reply. go-nfs
// builds the whole reply in memory: each ~150-byte call pinned 16 MiB for
// as long as the client kept the connection (a review). The proxy cuts a
// READ's count to maxRead (what FSINFO tells), and a reply's write gives
// up after replyWriteTimeout.
func TestStalledReadHoldsMemory(t *testing.T) {
	addr, _ := serve(t, t.TempDir(), Fsync{})
	c := dialNFS(t, addr)
	f := newFile(t, c, "big")
	mustOK(t, "SETATTR size", c.truncate(f, 16<<20))

	const n = 6
	before := heapNow()
	var conns []net.Conn
	for i := range n {
		conn, err := dialTCP(addr)
		if err != nil {
			t.Fatal(err)
		}
		// The attacker reads nothing; a small receive buffer is its
		// choice too.
		conn.(*net.TCPConn).SetReadBuffer(4 << 10)
		conns = append(conns, conn)
		if _, err := conn.Write(readCall(uint32(100+i), f, 0, 16<<20)); err != nil {
			t.Fatal(err)
		}
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	time.Sleep(2 * time.Second)
	after := heapNow()
	held := int64(after) - int64(before)
	t.Logf("%d stalled READs of 16 MiB: heap %d -> %d MiB (%d MiB held)", n, before>>20, after>>20, held>>20)
	if held > 32<<20 {
		t.Errorf("%d READ calls (%d bytes sent in all) whose replies the client does not read hold %d MiB of the server's heap", n, n*len(readCall(0, f, 0, 0)), held>>20)
	}
}

// warnCounter counts the records logged at warning level or above.
type warnCounter struct{ n atomic.Int64 }

func (h *warnCounter) Enabled(context.Context, slog.Level) bool { return true }
func (h *warnCounter) Handle(_ context.Context, r slog.Record) error {
	if r.Level >= slog.LevelWarn {
		h.n.Add(1)
	}
	return nil
}
func (h *warnCounter) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *warnCounter) WithGroup(string) slog.Handler      { return h }

// TestGarbageArgsLogFlood: every call whose arguments are out of
// bounds is answered GARBAGE_ARGS and was logged as a warning, with no
// limit: one connection of an allowed client wrote a log line per
// ~330-byte call, as fast as it sent them (a review). At most warnLimit a
// connection now.
func TestGarbageArgsLogFlood(t *testing.T) {
	counter := &warnCounter{}
	old := slog.Default()
	slog.SetDefault(slog.New(counter))
	defer slog.SetDefault(old)
	addr, _ := serve(t, t.TempDir(), Fsync{})
	conn := rawConn(t, addr)
	call := rpcCall(1, procLookup, dirop(make([]byte, handleLen), string(bytes.Repeat([]byte{'a'}, 300))))
	const sent = 2000
	var all []byte
	for range sent {
		all = append(all, call...)
	}
	go conn.Write(all)
	for range sent {
		if _, accept, _ := reply(t, conn); accept != garbageArgs {
			t.Fatalf("accept state %d, want GARBAGE_ARGS", accept)
		}
	}
	t.Logf("%d calls with a 300-byte name: %d warnings logged", sent, counter.n.Load())
	if n := counter.n.Load(); n > 10 {
		t.Errorf("one client connection made the server log %d warnings with %d calls (%d KiB sent)", n, sent, len(all)>>10)
	}
}

// TestConnectionsCapped: a host of the allowed networks opening
// connections and sending nothing cost the server about 200 KiB each,
// with no limit (a review): past maxConnsPerHost the server closes them.
func TestConnectionsCapped(t *testing.T) {
	addr, _ := serve(t, t.TempDir(), Fsync{})
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range maxConnsPerHost + 8 {
		c, err := dialTCP(addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	// Each connection is read at once, for 300 ms: one open waits them
	// out, one the server closed ends.
	errs := make([]error, len(conns))
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			var b [1]byte
			_, errs[i] = c.Read(b[:])
		})
	}
	wg.Wait()
	closed := 0
	for i, err := range errs {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			continue // kept open
		}
		if i < maxConnsPerHost {
			t.Errorf("connection %d closed (%v): within the limit of %d a host", i, err, maxConnsPerHost)
		}
		closed++
	}
	if closed != 8 {
		t.Errorf("%d connections of %d closed, want the 8 over the limit of %d a host", closed, len(conns), maxConnsPerHost)
	}
	// One closed, one more is taken.
	conns[0].Close()
	time.Sleep(200 * time.Millisecond)
	c, err := dialTCP(addr)
	if err != nil {
		t.Fatal(err)
	}
	conns[0] = c
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	var b [1]byte
	if _, err := c.Read(b[:]); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("a connection after one of the host's closed: %v, want it kept open", err)
	}
}
