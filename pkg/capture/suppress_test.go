package capture

import (
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/loopfs"
	"golang.org/x/sys/unix"
)

// recorder reads a capture's records in the background.
type recorder struct {
	ch     chan Record
	byHook map[uint8]int // records drained, by the hook that emitted them
}

func newRecorder(c *Capture) *recorder {
	r := &recorder{ch: make(chan Record, 1<<16), byHook: map[uint8]int{}}
	go func() {
		for {
			var rec Record
			if err := c.Read(&rec); err != nil {
				close(r.ch)
				return
			}
			r.ch <- rec
		}
	}()
	return r
}

// drain returns the records read until none came for 300 ms.
func (r *recorder) drain() []Record { return r.read(nil, nil) }

// until returns the records read until one that pred accepts came (or, after
// 2 s, none came for 300 ms): what a check of one store waits for, without
// drain's idle wait once it is there.
func (r *recorder) until(pred func(Record) bool) []Record {
	return r.read(pred, time.After(2*time.Second))
}

// read returns the records read until pred accepts one, or, once
// deadline has passed (at once when it is nil), none came for 300 ms.
func (r *recorder) read(pred func(Record) bool, deadline <-chan time.Time) (out []Record) {
	idle := deadline == nil
	for {
		var quiet <-chan time.Time
		if idle {
			quiet = time.After(300 * time.Millisecond)
		}
		select {
		case rec, ok := <-r.ch:
			if !ok {
				return out
			}
			out = append(out, rec)
			r.byHook[rec.Hook]++
			if pred != nil && pred(rec) {
				return out
			}
		case <-deadline:
			idle, deadline = true, nil
		case <-quiet:
			return out
		}
	}
}

// forgetFile drops the chunk marks of a file's first size bytes, as the
// reader does once it read them, so that later writes report again.
func forgetFile(t *testing.T, c *Capture, ino uint64, size int64) {
	t.Helper()
	var k CaptureChunkKey
	var v uint64
	it := c.objs.Chunks.Iterate()
	var dev uint32
	for it.Next(&k, &v) {
		if k.Ino == ino {
			dev = k.Dev
			break
		}
	}
	var keys []CaptureChunkKey
	for i := uint64(0); i < uint64(size)>>ChunkShift; i++ {
		keys = append(keys, CaptureChunkKey{Dev: dev, Ino: ino, Chunk: i})
	}
	if err := c.ForgetChunks(keys); err != nil {
		t.Fatal(err)
	}
}

// TestScatteredWritesOnMigratingTask: 4 KiB writes into a file whose page
// cache holds large folios (written sequentially, then cleaned), by a
// thread that keeps moving between CPUs. Each write dirties a whole clean
// folio; the dirtying must be told apart from a store through a mapping,
// also when the thread moved or was held up between its write_end and the
// dirtying (a migration there is rare here; host steal time of more than
// the old 50 µs window was what the lab hit). A miss reports the
// whole folio (up to 2 MiB) as changed through a mapping: the reader then
// writes it back and ships it, and the resync bitmap marks it (the lab's
// TestResyncAfterCleanStop sent 1.3× the bytes written).
func TestScatteredWritesOnMigratingTask(t *testing.T) {
	onEachFS(t, testScatteredWritesOnMigratingTask)
}

func testScatteredWritesOnMigratingTask(t *testing.T, fstype string, mib int) {
	if runtime.NumCPU() < 2 {
		t.Skip("needs two CPUs to move the writer between")
	}
	fs := loopfs.Make(t, fstype, max(256, mib))
	c := openOn(t, fstype, fs.Mount)
	rec := newRecorder(c)
	const size = 128 << 20
	f, err := os.Create(filepath.Join(fs.Mount, "big"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fill := make([]byte, 1<<20)
	for i := 0; i < size>>20; i++ {
		if _, err := f.Write(fill); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	var fst syscall.Stat_t
	syscall.Fstat(int(f.Fd()), &fst)
	rec.drain()
	forgetFile(t, c, fst.Ino, size)

	// The writer, on its own thread, moved by another between CPUs.
	tidc := make(chan int)
	var stop atomic.Bool
	done := make(chan struct{})
	written := map[uint64]bool{}
	go func() {
		defer close(done)
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tidc <- unix.Gettid()
		rng := rand.New(rand.NewSource(1))
		buf := make([]byte, 4096)
		for range 4000 {
			blk := uint64(rng.Intn(size / 4096))
			rng.Read(buf)
			if _, err := f.WriteAt(buf, int64(blk)*4096); err != nil {
				t.Error(err)
				return
			}
			written[blk] = true
		}
	}()
	tid := <-tidc
	moves := 0
	go func() {
		var sets [2]unix.CPUSet
		sets[0].Set(0)
		sets[1].Set(1)
		for i := 0; !stop.Load(); i++ {
			if unix.SchedSetaffinity(tid, &sets[i%2]) == nil {
				moves++
			}
		}
	}()
	<-done
	stop.Store(true)
	mmap, marked := 0, map[uint64]bool{}
	for _, r := range rec.drain() {
		if r.Ino != fst.Ino {
			continue
		}
		if r.Kind == KindMmap {
			mmap++
			t.Logf("reported as a store through a mapping: [%d, %d)", r.Pos, r.Pos+r.Len)
		}
		for b := r.Pos >> 12; b < (r.Pos+r.Len+4095)>>12; b++ {
			marked[b] = true
		}
	}
	for b := range written {
		if !marked[b] {
			t.Fatalf("page %d written, no record covers it", b)
		}
	}
	t.Logf("%d pages written by a thread moved %d times: %d pages reported, %d as mapping stores", len(written), moves, len(marked), mmap)
	if mmap > 0 {
		t.Fatalf("%d write(2)s reported as stores through a mapping (their whole folio shipped)", mmap)
	}
}

// TestStoreAfterWriteReturnedIsReported: a write(2) into a folio that is
// already dirty leaves its mark unused; once the write returned, a store
// through a mapping that dirties the folio again (after an fsync cleaned
// it) must be reported, however soon it comes.
func TestStoreAfterWriteReturnedIsReported(t *testing.T) {
	onEachFS(t, testStoreAfterWriteReturnedIsReported)
}

func testStoreAfterWriteReturnedIsReported(t *testing.T, fstype string, mib int) {
	c, rec, f, fst, m := mappedFile(t, fstype, mib)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	const off = 40960
	fast := 0
	for round := range 10 {
		rec.drain()
		forgetFile(t, c, fst.Ino, 1<<20)
		f.WriteAt([]byte{1}, off)   // dirties the folio
		f.WriteAt([]byte{2}, off+1) // already dirty: its mark stays unused
		t0 := time.Now()
		if err := unix.Fdatasync(int(f.Fd())); err != nil { // cleans it
			t.Fatal(err)
		}
		m[off+3000] = byte(round) // same page, away from the writes: a store
		if time.Since(t0) < 5*time.Millisecond {
			fast++
		}
		isStore := func(r Record) bool {
			return r.Ino == fst.Ino && r.Kind == KindMmap && r.Pos <= off+3000 && r.Pos+r.Len > off+3000
		}
		found := slices.ContainsFunc(rec.until(isStore), isStore)
		if !found {
			t.Fatalf("round %d: a store through the mapping right after a write(2) returned was not reported", round)
		}
	}
	t.Logf("10 stores reported; %d came within 5 ms of the write", fast)
}

// coversByte accepts a record of ino covering byte at.
func coversByte(ino, at uint64) func(Record) bool {
	return func(r Record) bool { return r.Ino == ino && r.Pos <= at && r.Pos+r.Len > at }
}

// storeReported reports whether a record of ino covers byte at.
func storeReported(recs []Record, ino, at uint64) bool {
	return slices.ContainsFunc(recs, coversByte(ino, at))
}

// TestStoreByIOWorkerAfterItsWriteIsReported: an io_uring write runs in
// an io-wq worker thread, which never returns from a write syscall, so no
// sys_exit_* hook drops the mark its write_end leaves. A write into a
// page already dirty leaves the mark unused; when the same worker then
// stores into that page through a shared mapping (a read into a buffer
// mapped from the file) after a write-back cleaned it, the store must be
// reported: nothing else ever reads those bytes.
func TestStoreByIOWorkerAfterItsWriteIsReported(t *testing.T) {
	onEachFS(t, testStoreByIOWorkerAfterItsWriteIsReported)
}

func testStoreByIOWorkerAfterItsWriteIsReported(t *testing.T, fstype string, mib int) {
	c, rec, f, fst, m := mappedFile(t, fstype, mib)
	r := newRing(t)
	src, err := os.Create(filepath.Join(t.TempDir(), "src")) // not watched
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if _, err := src.Write(make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	const off, store = 40960, 40960 + 2048
	fast := 0
	for round := range 10 {
		rec.drain()
		forgetFile(t, c, fst.Ino, 1<<20)
		if _, err := f.WriteAt([]byte{1}, off); err != nil { // dirties the page
			t.Fatal(err)
		}
		if _, err := r.do(ioringOpWrite, int(f.Fd()), []byte{2}, off+1); err != nil { // its mark stays unused
			t.Fatalf("io_uring write: %v", err)
		}
		t0 := time.Now()
		if err := unix.SyncFileRange(int(f.Fd()), off, 4096,
			unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER); err != nil {
			t.Fatal(err) // cleans the page
		}
		src.WriteAt([]byte{byte(round + 1)}, 0)
		if _, err := r.do(ioringOpRead, int(src.Fd()), m[store:store+1], 0); err != nil { // the worker stores
			t.Fatalf("io_uring read into the mapping: %v", err)
		}
		if time.Since(t0) < 5*time.Millisecond {
			fast++
		}
		if m[store] != byte(round+1) {
			t.Fatalf("round %d: the read did not land in the mapping", round)
		}
		if !storeReported(rec.until(coversByte(fst.Ino, store)), fst.Ino, store) {
			t.Fatalf("round %d: a store through the mapping by the io-wq worker that wrote the page before was not reported (%d of %d rounds within 5 ms)", round, fast, round+1)
		}
	}
	t.Logf("10 stores reported; %d came within 5 ms of the worker's write", fast)
}

// TestStoreIntoPageDirtiedByWriteIsReported: a write(2) into a clean page
// of a file mapped shared dirties it; a store through the mapping into the
// same page then finds it dirty and dirties nothing, so no hook fires for
// it. The record of the write must cover the store too (the reader writes
// back and reads what records cover): reporting only the bytes written
// loses the store.
func TestStoreIntoPageDirtiedByWriteIsReported(t *testing.T) {
	onEachFS(t, testStoreIntoPageDirtiedByWriteIsReported)
}

func testStoreIntoPageDirtiedByWriteIsReported(t *testing.T, fstype string, mib int) {
	c, rec, f, fst, m := mappedFile(t, fstype, mib)
	const off, store = 40960, 40960 + 3000
	for round := range 3 {
		if err := unix.Fdatasync(int(f.Fd())); err != nil { // the page is clean
			t.Fatal(err)
		}
		rec.drain()
		forgetFile(t, c, fst.Ino, 1<<20)
		if _, err := f.WriteAt([]byte{1}, off); err != nil { // dirties it
			t.Fatal(err)
		}
		m[store] = byte(round + 1) // no fault dirties anything: already dirty
		if !storeReported(rec.until(coversByte(fst.Ino, store)), fst.Ino, store) {
			t.Fatalf("round %d: a store through the mapping into a page a write(2) had just dirtied is covered by no record", round)
		}
	}
}

// mappedFile captures a fresh filesystem of fstype and creates a 1 MiB file "m" in it,
// mapped shared and writable, all undone when the test ends.
func mappedFile(t *testing.T, fstype string, mib int) (*Capture, *recorder, *os.File, syscall.Stat_t, []byte) {
	t.Helper()
	fs := loopfs.Make(t, fstype, max(64, mib))
	c := openOn(t, fstype, fs.Mount)
	rec := newRecorder(c)
	f, err := os.Create(filepath.Join(fs.Mount, "m"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	var fst syscall.Stat_t
	syscall.Fstat(int(f.Fd()), &fst)
	m, err := unix.Mmap(int(f.Fd()), 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(m) })
	return c, rec, f, fst, m
}
