package capture

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/loopfs"
	"golang.org/x/sys/unix"
)

func TestDecodeRecordRejectsShort(t *testing.T) {
	var r Record
	if err := decodeRecord(make([]byte, recordSize-1), &r); err == nil {
		t.Fatal("short record decoded without error")
	}
}

func TestKernelDev(t *testing.T) {
	// 7:3 (loop3) is 0x703 in stat's encoding and 7<<20|3 in the kernel's.
	if got := KernelDev(unix.Mkdev(7, 3)); got != 7<<20|3 {
		t.Fatalf("KernelDev(7:3) = %#x", got)
	}
}

// collect reads records until quiet for 200ms.
func collect(t *testing.T, c *Capture) []Record {
	t.Helper()
	ch := make(chan Record, 1<<16)
	go func() {
		for {
			var r Record
			if err := c.Read(&r); err != nil {
				close(ch)
				return
			}
			ch <- r
		}
	}()
	var out []Record
	for {
		select {
		case r, ok := <-ch:
			if !ok {
				return out
			}
			out = append(out, r)
		case <-time.After(200 * time.Millisecond):
			return out
		}
	}
}

// openExt4 opens a capture watching a new ext4 loop filesystem, closed
// when the test ends.
func openExt4(t *testing.T) (*Capture, *loopfs.FS) {
	t.Helper()
	return openExt4Ring(t, 0)
}

// openExt4Ring is openExt4 with a ring of ringBytes (0: the default).
func openExt4Ring(t *testing.T, ringBytes uint32) (*Capture, *loopfs.FS) {
	t.Helper()
	fs := loopfs.Make(t, "ext4", 64)
	var st syscall.Stat_t
	if err := syscall.Stat(fs.Mount, &st); err != nil {
		t.Fatal(err)
	}
	c, err := Open(Options{Devices: []uint64{st.Dev}, RingBytes: ringBytes})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, fs
}

func TestCaptureExt4(t *testing.T) {
	c, fs := openExt4(t)
	for _, h := range c.Hooks() {
		t.Logf("hook %-28s active=%v %s", h.Name, h.Active, h.Error)
	}
	p := filepath.Join(fs.Mount, "f")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("hello"), 100000); err != nil {
		t.Fatal(err)
	}
	var fst syscall.Stat_t
	syscall.Fstat(int(f.Fd()), &fst)
	f.Close()
	recs := collect(t, c)
	var sawData, sawAttr bool
	for _, r := range recs {
		t.Logf("%+v", r)
		if r.Ino == fst.Ino && r.Kind == KindData && r.Pos <= 100000 && r.Pos+r.Len >= 100005 {
			sawData = true
		}
		if r.Kind == KindAttr {
			sawAttr = true
		}
	}
	if !sawData || !sawAttr {
		t.Fatalf("data=%v attr=%v in %d records", sawData, sawAttr, len(recs))
	}
}

// TestForgetChunksSkipsMissing: a batch delete stops at the first key that
// has no mark; every other key must still be dropped, or a stale mark would
// hide later writes.
func TestForgetChunksSkipsMissing(t *testing.T) {
	loopfs.RequireRoot(t)
	c, err := Open(Options{})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer c.Close()
	var keys []CaptureChunkKey
	for i := uint64(0); i < 10; i++ {
		k := CaptureChunkKey{Dev: 1, Ino: 42, Chunk: i}
		keys = append(keys, k)
		if i%3 != 0 { // keys 0, 3, 6, 9 have no mark
			if err := c.objs.Chunks.Put(&k, uint64(1)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := c.ForgetChunks(keys); err != nil {
		t.Fatal(err)
	}
	var v uint64
	for i := range keys {
		if err := c.objs.Chunks.Lookup(&keys[i], &v); err == nil {
			t.Errorf("chunk %d still marked after ForgetChunks", i)
		}
	}
}

// TestMarksListsEveryMark: Marks lists the attribute and data marks set,
// and none once forgotten (the node's audit of stuck marks reads them).
func TestMarksListsEveryMark(t *testing.T) {
	loopfs.RequireRoot(t)
	c, err := Open(Options{})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer c.Close()
	ik := CaptureInodeKey{Dev: 3, Ino: 77}
	if err := c.objs.Attrs.Put(&ik, uint8(1)); err != nil {
		t.Fatal(err)
	}
	ck := CaptureChunkKey{Dev: 3, Ino: 78, Chunk: 5}
	if err := c.objs.Chunks.Put(&ck, uint64(1)); err != nil {
		t.Fatal(err)
	}
	attrs, chunks, err := c.Marks()
	if err != nil {
		t.Fatal(err)
	}
	if len(attrs) != 1 || attrs[0] != (InodeKey{Dev: 3, Ino: 77}) || len(chunks) != 1 || chunks[0] != ck {
		t.Fatalf("Marks: %v %v, want inode 77's attribute mark and inode 78's chunk 5", attrs, chunks)
	}
	c.ForgetAttr(attrs[0])
	c.ForgetChunks(chunks)
	if attrs, chunks, err = c.Marks(); err != nil || len(attrs)+len(chunks) != 0 {
		t.Errorf("after forgetting: %v %v (%v)", attrs, chunks, err)
	}
}

// TestChunkCoalescing checks the in-kernel contract: a sequential writer
// costs a few records per 1 MiB chunk while every byte stays covered, and
// small disjoint writes in one chunk are reported exactly (no gap; on
// btrfs, their blocks).
func TestChunkCoalescing(t *testing.T) { onEachFS(t, testChunkCoalescing) }

func testChunkCoalescing(t *testing.T, fstype string, mib int) {
	fs := loopfs.Make(t, fstype, max(64, mib))
	c := openOn(t, fstype, fs.Mount)

	seq, _ := os.Create(filepath.Join(fs.Mount, "seq"))
	page := make([]byte, 4096)
	for off := int64(0); off < 1<<20; off += 4096 {
		seq.WriteAt(page, off)
	}
	var seqSt syscall.Stat_t
	syscall.Fstat(int(seq.Fd()), &seqSt)
	seq.Close()

	sc, _ := os.Create(filepath.Join(fs.Mount, "scattered"))
	sc.WriteAt(make([]byte, 100), 1000)
	sc.WriteAt(make([]byte, 100), 30000)
	var scSt syscall.Stat_t
	syscall.Fstat(int(sc.Fd()), &scSt)
	sc.Close()

	// A log: 100-byte appends (not a multiple of the marks' 16-byte
	// units, so each ends inside one). And a file of 6 bytes.
	lg, _ := os.Create(filepath.Join(fs.Mount, "log"))
	line := make([]byte, 100)
	for range 50 {
		lg.Write(line)
	}
	var lgSt syscall.Stat_t
	syscall.Fstat(int(lg.Fd()), &lgSt)
	lg.Close()
	os.WriteFile(filepath.Join(fs.Mount, "tiny"), []byte("hello\n"), 0o644)
	var tinySt syscall.Stat_t
	syscall.Stat(filepath.Join(fs.Mount, "tiny"), &tinySt)

	var seqRecs, logRecs int
	logCovered := make([]bool, 5000)
	var tiny [][2]uint64
	covered := make([]bool, 1<<20)
	var scattered [][2]uint64
	for _, r := range collect(t, c) {
		if r.Kind != KindData {
			continue
		}
		switch r.Ino {
		case seqSt.Ino:
			seqRecs++
			for b := r.Pos; b < r.Pos+r.Len && b < 1<<20; b++ {
				covered[b] = true
			}
		case lgSt.Ino:
			logRecs++
			for b := r.Pos; b < r.Pos+r.Len && b < 5000; b++ {
				logCovered[b] = true
			}
		case tinySt.Ino:
			if r.Pos < uint64(tinySt.Size) { // XFS: a tail from the size, as below
				tiny = append(tiny, [2]uint64{r.Pos, r.Pos + r.Len})
			}
		case scSt.Ino:
			// XFS trims its preallocation past EOF at close: a
			// tail from the size, which holds no bytes.
			if r.Pos < uint64(scSt.Size) {
				scattered = append(scattered, [2]uint64{r.Pos, r.Pos + r.Len})
			}
		}
	}
	for b, ok := range covered {
		if !ok {
			t.Fatalf("sequential write: byte %d not covered by any record", b)
		}
	}
	// 256 page appends in one 1 MiB chunk: each record announces as far
	// ahead as the run already reaches, past the end of the file only to
	// the next 64 KiB (about 20 of them).
	if seqRecs == 0 || seqRecs > 32 {
		t.Fatalf("sequential 1 MiB in 4 KiB writes: %d records, want at most %d", seqRecs, 32)
	}
	t.Logf("sequential 1 MiB in 256 writes: %d records", seqRecs)
	for b, ok := range logCovered {
		if !ok {
			t.Fatalf("appends of 100 bytes: byte %d not covered by any record", b)
		}
	}
	// Each append touches the mark (rounded in, it ends up to 15 bytes
	// short of its record): a run, announced ahead, not 50 records.
	if logRecs > 20 {
		t.Fatalf("50 appends of 100 bytes: %d records, want a run of a few", logRecs)
	}
	t.Logf("50 appends of 100 bytes: %d records", logRecs)
	if fstype != "btrfs" && (len(tiny) != 1 || tiny[0] != [2]uint64{0, 6}) {
		// (btrfs names the block.) Past the end, the pass retried the
		// file as bytes beyond EOF for 2 s.
		t.Fatalf("a file of 6 bytes reported as %v, want exactly [0 6]", tiny)
	}
	// Exactly the bytes written: a record rounded out to the marks'
	// 16-byte units went past a short file's end.
	want := [][2]uint64{{1000, 1100}, {30000, 30100}}
	if fstype == "btrfs" {
		// btrfs's hook names the blocks a write dirtied, not its bytes.
		want = [][2]uint64{{0, 4096}, {28672, 32768}}
	}
	if len(scattered) != 2 || scattered[0] != want[0] || scattered[1] != want[1] {
		t.Fatalf("scattered writes reported as %v, want exactly %v", scattered, want)
	}
}

// duet status asks for the ring's fill while the node may be leaving the
// primary role: a closed capture answers 0 (it dereferenced the closed
// reader's ring, a nil pointer, and the daemon died; the nemesis saw it).
func TestBufferedAfterClose(t *testing.T) {
	loopfs.RequireRoot(t)
	c, err := Open(Options{})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if n := c.Buffered(); n != 0 {
		t.Errorf("a new ring holds %d bytes", n)
	}
	c.Close()
	if n := c.Buffered(); n != 0 {
		t.Errorf("a closed capture reports %d bytes waiting", n)
	}
}

// A btrfs write is reported by the time its syscall returns, every byte of
// it: a durability call made next must find its records in the ring.
func TestBtrfsWriteReportedByItsReturn(t *testing.T) {
	fs := loopfs.Make(t, "btrfs", 256)
	c := openOn(t, "btrfs", fs.Mount)
	f, err := os.Create(filepath.Join(fs.Mount, "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	before, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	const size = 256 << 10
	if _, err := f.WriteAt(make([]byte, size), 0); err != nil {
		t.Fatal(err)
	}
	after, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	var data []Record
	for _, r := range collect(t, c) {
		if r.Ino == st.Ino && r.Kind == KindData && r.Seq > before.Seq && r.Seq <= after.Seq {
			data = append(data, r)
		}
	}
	if !covers(data, st.Ino, KindData, 0, size) {
		t.Fatalf("a write of 256 KiB returned with records %v emitted, want [0, %d) covered", data, size)
	}
}

// TestCountersMapped: the counters read through the mapping are the map's
// values (as a bpf() lookup reads them), follow the programs' additions,
// and a closed capture reports an error instead of touching the unmapped
// memory.
func TestCountersMapped(t *testing.T) {
	c, fs := openExt4(t)
	before, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := os.WriteFile(filepath.Join(fs.Mount, fmt.Sprintf("f%d", i)), []byte("hello"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	collect(t, c)
	got, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if want, err := c.lookupCounters(); err != nil || got != want {
		t.Errorf("mapped counters %+v, the map holds %+v (%v)", got, want, err)
	}
	if got.Seq < before.Seq+3 {
		t.Errorf("sequence %d after three new files, %d before", got.Seq, before.Seq)
	}
	// The rescan counter is the one userspace writes: the mapping sees it.
	if err := c.objs.Counters.Put(uint32(ctrRescan), uint64(7)); err != nil {
		t.Fatal(err)
	}
	if got, _ := c.Counters(); got.Rescan != 7 {
		t.Errorf("rescan counter %d through the mapping after storing 7", got.Rescan)
	}
	c.Close()
	if _, err := c.Counters(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Counters after Close: %v, want os.ErrClosed", err)
	}
}

// lookupCounters reads the counters by bpf() lookups, as Counters did
// before they were mapped.
func (c *Capture) lookupCounters() (Counters, error) {
	var out Counters
	for i, dst := range []*uint64{&out.Seq, &out.Lost, &out.Rescan} {
		if err := c.objs.Counters.Lookup(uint32(i), dst); err != nil {
			return out, fmt.Errorf("lookup of counter %d: %w", i, err)
		}
	}
	return out, nil
}

// TestBtrfsWriteAfterForgetReported: a btrfs writer keeps the chunk mark
// it last found in its task's storage and skips the chunk's lookup while
// the forget epoch stands. A write into the same bytes after the reader
// forgot the chunk (as it does before reading a batch) must be reported
// again, by the same thread. A ForgetChunks that deleted the marks but
// left the epoch alone lost the second write: no record, and the reader,
// which had read the chunk before it, never read it again.
func TestBtrfsWriteAfterForgetReported(t *testing.T) {
	c, f, _ := btrfsFile(t)
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	rc := newRecorder(c)
	// One thread: the cache is per task.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	buf := make([]byte, 64<<10)
	for round := range 3 {
		if _, err := f.WriteAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		if !covers(rc.drain(), st.Ino, KindData, 0, uint64(len(buf))) {
			t.Fatalf("round %d: the 64 KiB write has no record covering it", round)
		}
		// The reader takes the record: it forgets the chunk, then reads.
		if err := c.ForgetChunks([]CaptureChunkKey{{Dev: KernelDev(st.Dev), Ino: st.Ino, Chunk: 0}}); err != nil {
			t.Fatal(err)
		}
		// Inside the extent the first write's mark announced.
		if _, err := f.WriteAt(buf[:4096], 8192); err != nil {
			t.Fatal(err)
		}
		if recs := rc.drain(); !covers(recs, st.Ino, KindData, 8192, 8192+4096) {
			t.Fatalf("round %d: a write after the chunk was forgotten was not reported (records %+v)", round, recs)
		}
		if err := c.ForgetChunks([]CaptureChunkKey{{Dev: KernelDev(st.Dev), Ino: st.Ino, Chunk: 0}}); err != nil {
			t.Fatal(err)
		}
	}
}
