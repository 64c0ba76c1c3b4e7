package capture

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/internal/threads"
	"github.com/duet-ha/duet/pkg/loopfs"
)

// bpfMapRSS sums the resident bytes of this process's mappings of BPF
// maps (the ring buffer's pages, the mapped counters).
func bpfMapRSS(t *testing.T) int64 {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var total int64
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		if strings.Contains(fields[0], "-") && len(fields) >= 5 {
			// A mapping's first line: address range, perms, offset,
			// device, inode, name.
			in = len(fields) >= 6 && strings.HasPrefix(fields[5], "anon_inode:bpf-map")
			continue
		}
		if in && fields[0] == "Rss:" {
			kb, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			total += kb << 10
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return total
}

// The ring buffer's data pages are mapped once: the kernel maps them twice
// in a row for a reader that wants wrapped records in one piece, and each
// mapping counts in the RSS (a 16 MiB ring showed as 32 MiB of the
// daemon's).
func TestRingMappedOnce(t *testing.T) {
	loopfs.RequireRoot(t)
	const ringBytes = 4 << 20
	before := bpfMapRSS(t)
	c, err := Open(Options{RingBytes: ringBytes})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer c.Close()
	grew := bpfMapRSS(t) - before
	t.Logf("mappings of BPF maps: %d KiB more resident with a %d KiB ring", grew>>10, ringBytes>>10)
	if grew < ringBytes {
		t.Fatalf("only %d KiB of BPF map mappings resident: the ring (%d KiB) is not where this test looks", grew>>10, ringBytes>>10)
	}
	if limit := int64(ringBytes + 64<<10); grew > limit {
		t.Fatalf("%d KiB of BPF map mappings resident for a %d KiB ring: its data pages are mapped more than once", grew>>10, ringBytes>>10)
	}
}

// Records read from a ring of one page wrap past its end every few dozen
// records (a record takes 56 bytes, the page 4096): each must be read
// whole, none twice, none skipped. The sequence numbers the kernel gives
// the records it could reserve are exactly 1..N; a record copied wrong
// across the end shows as a number out of that range, a repeat, or a
// device that is not the watched one.
func TestRingWrapsRecordsWhole(t *testing.T) {
	fs := loopfs.Make(t, "ext4", 64)
	var st syscall.Stat_t
	if err := syscall.Stat(fs.Mount, &st); err != nil {
		t.Fatal(err)
	}
	c, err := Open(Options{Devices: []uint64{st.Dev}, RingBytes: 4096})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer c.Close()
	if err := c.SetEagerWake(true); err != nil {
		t.Fatal(err)
	}
	dev := KernelDev(st.Dev)

	var (
		mu   sync.Mutex
		seen = map[uint64]int{}
		bad  []string
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			var r Record
			if err := c.Read(&r); err != nil {
				return
			}
			mu.Lock()
			seen[r.Seq]++
			if r.Dev != dev || r.Kind == 0 || r.Kind > KindNew {
				bad = append(bad, fmt.Sprintf("%+v", r))
			}
			mu.Unlock()
		}
	}()

	for i := range 3000 {
		p := filepath.Join(fs.Mount, fmt.Sprintf("f%d", i%200))
		if err := os.WriteFile(p, []byte(strings.Repeat("x", 1+i%300)), 0o644); err != nil {
			t.Fatal(err)
		}
		if i%7 == 0 {
			c.Kick()
		}
	}
	// Every record reserved is read once the ring is empty.
	deadline := time.Now().Add(10 * time.Second)
	var ctr Counters
	for {
		if ctr, err = c.Counters(); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		n := uint64(len(seen))
		mu.Unlock()
		if n >= ctr.Seq && c.Buffered() == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("read %d distinct records of %d reserved after 10 s", n, ctr.Seq)
		}
		c.Kick()
		time.Sleep(10 * time.Millisecond)
	}
	c.StopReading()
	<-done
	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d records read, %d lost to a full ring", len(seen), ctr.Lost)
	if ctr.Seq < 2000 {
		t.Fatalf("only %d records: the ring wrapped too few times to test anything", ctr.Seq)
	}
	for _, b := range bad {
		t.Errorf("record read wrong: %s", b)
	}
	for s, n := range seen {
		if s == 0 || s > ctr.Seq {
			t.Errorf("sequence %d read, outside 1..%d", s, ctr.Seq)
		}
		if n > 1 {
			t.Errorf("sequence %d read %d times", s, n)
		}
	}
	if uint64(len(seen)) != ctr.Seq {
		t.Errorf("%d distinct records read, %d reserved", len(seen), ctr.Seq)
	}
}

// A read waiting on an empty ring returns for each of the three things
// that end its wait before its deadline: the producer's wake-up of a
// record, a kick (a barrier wants what is there now), and close. Each
// would otherwise hold it until the deadline, ten seconds here.
func TestRingWaitEndsEarly(t *testing.T) {
	fs, c := openSmallRing(t)
	if err := c.SetEagerWake(true); err != nil {
		t.Fatal(err)
	}
	r := c.reader
	drain := func() {
		for {
			if _, err := r.read(nil, time.Now().Add(50*time.Millisecond)); err != nil {
				return
			}
		}
	}
	const long = 10 * time.Second
	type result struct {
		rec []byte
		err error
	}
	wait := func(do func()) result {
		t.Helper()
		drain()
		ch := make(chan result, 1)
		go func() {
			b, err := r.read(nil, time.Now().Add(long))
			ch <- result{b, err}
		}()
		time.Sleep(100 * time.Millisecond) // let it block
		if tids, err := threads.InSyscallOn(r.epfd); err != nil {
			t.Fatal(err)
		} else if len(tids) > 0 {
			t.Errorf("threads %v wait in a system call on the ring's epoll (fd %d), each holding a P: the wait belongs in Go's poller", tids, r.epfd)
		}
		do()
		select {
		case res := <-ch:
			return res
		case <-time.After(long / 2):
			t.Fatalf("the read still waits %v later", long/2)
			return result{}
		}
	}

	res := wait(func() {
		if err := os.WriteFile(filepath.Join(fs.Mount, "f"), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	if res.err != nil || len(res.rec) < recordSize {
		t.Errorf("a write during the wait: %d bytes, %v; want a record", len(res.rec), res.err)
	}
	if res := wait(c.Kick); res.err != errFlushed {
		t.Errorf("a kick during the wait: %d bytes, %v; want %v", len(res.rec), res.err, errFlushed)
	}
	if res := wait(c.StopReading); res.err != os.ErrClosed {
		t.Errorf("a stop during the wait: %v; want %v", res.err, os.ErrClosed)
	}
	if _, err := r.read(nil, time.Now().Add(long)); err != os.ErrClosed {
		t.Errorf("a read after the stop: %v; want %v", err, os.ErrClosed)
	}
}

// An empty ring's read returns os.ErrDeadlineExceeded at its deadline,
// about then, and again for a deadline already past; a later deadline
// (set anew) waits again.
func TestRingWaitDeadline(t *testing.T) {
	_, c := openSmallRing(t)
	r := c.reader
	for {
		if _, err := r.read(nil, time.Now().Add(50*time.Millisecond)); err != nil {
			break
		}
	}
	for _, d := range []time.Duration{-time.Second, 200 * time.Millisecond, 300 * time.Millisecond} {
		start := time.Now()
		_, err := r.read(nil, start.Add(d))
		took := time.Since(start)
		if err != os.ErrDeadlineExceeded {
			t.Fatalf("a read with a deadline %v away: %v; want %v", d, err, os.ErrDeadlineExceeded)
		}
		if took < d || took > max(d, 0)+2*time.Second {
			t.Errorf("a read with a deadline %v away returned after %v", d, took)
		}
	}
}

// openSmallRing makes an ext4 filesystem and a capture of it with a
// 64 KiB ring, closed at the test's end.
func openSmallRing(t *testing.T) (*loopfs.FS, *Capture) {
	t.Helper()
	c, fs := openExt4Ring(t, 1<<16)
	return fs, c
}

// No wake-up is lost between the ring found empty and the reader parked
// in Go's poller: a read with no deadline, woken a random 0 to 200 µs
// after it began by a record (three in four) or a kick, returns every
// time, 2,000 times. (The reader checks the ring without waiting, then
// parks until the poller sees the ring's epoll become readable: an event
// in between must not be missed. From a review.)
func TestRingNoLostWakeUp(t *testing.T) {
	fs, c := openSmallRing(t)
	if err := c.SetEagerWake(true); err != nil {
		t.Fatal(err)
	}
	r := c.reader
	f, err := os.Create(filepath.Join(fs.Mount, "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	drain := func() { // what is there, without waiting
		for {
			if _, err := r.read(nil, time.Now()); err != nil {
				return
			}
		}
	}
	for i := range 2000 {
		drain()
		done := make(chan error, 1)
		go func() {
			_, err := r.read(nil, time.Time{})
			done <- err
		}()
		time.Sleep(time.Duration(i*7919%200) * time.Microsecond)
		if i%4 == 3 {
			c.Kick()
		} else if _, err := f.WriteAt([]byte{byte(i)}, int64(i)); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err != nil && err != errFlushed {
				t.Fatalf("round %d: %v", i, err)
			}
		case <-time.After(5 * time.Second):
			c.StopReading() // ends the read left waiting
			t.Fatalf("round %d: the read was not woken (by a %s)", i, map[bool]string{true: "kick", false: "record"}[i%4 == 3])
		}
	}
}
