package replica

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/wire"
)

// randomFile is a file of n random bytes, open for reading.
func randomFile(t *testing.T, n int) (*os.File, []byte) {
	t.Helper()
	data := make([]byte, n)
	rand.Read(data)
	return fileOf(t, data), data
}

// fileOf is a new file holding data, open for reading.
func fileOf(t *testing.T, data []byte) *os.File {
	t.Helper()
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// textFile is a new file of n bytes of text that compresses, open for
// reading.
func textFile(t *testing.T, n int) (*os.File, []byte) {
	t.Helper()
	text := []byte(strings.Repeat("a line of a log file, compressible enough 0123456789\n", n/53+1))[:n]
	return fileOf(t, text), text
}

// bigBatch batches a read of 1 MiB of f (random bytes, so the batch goes
// as it is), as the build pass does, and queues it.
func bigBatch(t *testing.T, bt *batcher, f *os.File) {
	t.Helper()
	bt.flushIfFull(1<<20 + 1)
	if got, err := bt.addRead("f", f, 0, 1<<20); got != 1<<20 {
		t.Fatalf("addRead: %d, %v", got, err)
	}
	bt.flush()
}

// A big batch that does not compress is its own frame: the batcher
// reads it into a buffer of frameRoom behind room for the header, writes
// the header there and hands the buffer over, without copying the batch;
// once the peer has acknowledged it, the next batch is built in that
// buffer, not in a new one.
func TestBigFrameBuiltInPlace(t *testing.T) {
	p := unconnectedPrimary(t)
	bt := &batcher{p: p, ctx: context.Background()}
	f, data := randomFile(t, 1<<20)
	bt.add(&wire.Op{Code: wire.OpMkdir, Path: "d", Mode: 0o755})
	bt.flushIfFull(1<<20 + 1)
	if _, err := bt.addRead("f", f, 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	built := &bt.raw[0]
	bt.flush()
	p.mu.Lock()
	b := p.out.batches[0]
	p.mu.Unlock()
	if &b.frame[0] != built || b.buf == nil || cap(b.frame) != frameRoom {
		t.Fatal("the batch was copied into its frame")
	}
	fr, err := wire.ReadSealedFrame(bytes.NewReader(b.frame), nil)
	if err != nil || fr.Seq != b.seq || fr.Flags&wire.FlagZstd != 0 {
		t.Fatalf("the frame reads as %+v, %v; want batch %d, not compressed", fr, err, b.seq)
	}
	ops, err := wire.DecodeOps(fr.Payload)
	if err != nil || len(ops) != 2 || ops[0].Code != wire.OpMkdir || !bytes.Equal(ops[1].Data, data) {
		t.Fatalf("the frame's ops: %d, %v", len(ops), err)
	}
	if cap(bt.raw) > 0 && &bt.raw[:1][0] == built {
		t.Fatal("the next batch is built in the frame in flight")
	}
	p.mu.Lock()
	p.ack(b.seq)
	p.mu.Unlock()
	bt.flushIfFull(1<<20 + 1)
	bt.addRead("f", f, 0, 1<<20)
	if &bt.raw[0] != built {
		t.Fatal("the acknowledged frame's buffer was not reused")
	}
}

// blockingConn holds its first big write until released, and keeps a
// copy of what that write was given, taken after the release: what the
// kernel would have sent.
type blockingConn struct {
	net.Conn
	held             atomic.Bool
	started, release chan struct{}
	sent             chan []byte
}

func (c *blockingConn) SetWriteDeadline(time.Time) error { return nil }

func (c *blockingConn) Write(b []byte) (int, error) {
	if len(b) > coalesceMax && c.held.CompareAndSwap(false, true) {
		close(c.started)
		<-c.release
		c.sent <- append([]byte(nil), b...)
	}
	return len(b), nil
}

// A frame the peer acknowledges while its write is still under way (its
// bytes reached the peer before the write returned) is not built into
// until the write returns: the sender pins it (outbox.pin).
func TestFrameInFlightIsNotReused(t *testing.T) {
	p := unconnectedPrimary(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	bt := &batcher{p: p, ctx: ctx}
	f, _ := randomFile(t, 1<<20)
	bigBatch(t, bt, f)
	p.mu.Lock()
	if p.out.batches[0].buf == nil {
		t.Fatal("the batch was not built in place")
	}
	want := append([]byte(nil), p.out.batches[0].frame...)
	seq := p.out.batches[0].seq
	p.mu.Unlock()

	c := &blockingConn{started: make(chan struct{}), release: make(chan struct{}), sent: make(chan []byte, 1)}
	errc := make(chan error, 1)
	go func() { errc <- p.writeBatches(ctx, c, 0, true) }()
	<-c.started
	// The peer's ack arrives while the write is under way, and the
	// batcher goes on: a spare buffer is what it would build into.
	p.mu.Lock()
	p.ack(seq)
	p.mu.Unlock()
	for range 3 {
		bigBatch(t, bt, f)
	}
	close(c.release)
	if got := <-c.sent; !bytes.Equal(got, want) {
		t.Fatal("the frame was overwritten while it was being written")
	}
	cancel()
	p.wake()
	<-errc
}

// The outbox's holds: a buffer goes to the spares when the last hold
// ends, whichever ends last, and at most maxSpares are kept.
func TestOutboxPins(t *testing.T) {
	o := newOutbox()
	var bufs []*frameBuf
	for range maxSpares + 1 {
		fb := &frameBuf{b: make([]byte, 10, 64), refs: 1}
		bufs = append(bufs, fb)
		o.push(sentBatch{seq: o.number(), frame: fb.b, buf: fb})
	}
	if o.bytes != 64*(maxSpares+1) {
		t.Fatalf("the outbox counts %d bytes, want the buffers' room, %d", o.bytes, 64*(maxSpares+1))
	}
	o.pin(o.batches[0])
	o.ack(1, time.Now(), nil)
	if o.spare() != nil {
		t.Fatal("a pinned frame's buffer became a spare")
	}
	o.unpin(sentBatch{buf: bufs[0]})
	o.drop()
	if len(o.spares) != maxSpares || o.bytes != 0 {
		t.Fatalf("after the last holds: %d spares, %d bytes; want %d and 0", len(o.spares), o.bytes, maxSpares)
	}
	if s := o.spare(); len(s) != 0 || cap(s) != 64 {
		t.Fatalf("a spare of %d bytes, room %d; want empty, room 64", len(s), cap(s))
	}
	o.dropSpares()
	if o.spare() != nil {
		t.Fatal("a spare survived dropSpares")
	}
}

// A write op read straight into the batch (addRead) encodes as the same
// op built from the bytes: whole, cut short by the end of the file (its
// length field made again), or none at all past it.
func TestAddReadEncodesAsAppendOp(t *testing.T) {
	p := unconnectedPrimary(t)
	f, data := randomFile(t, 300<<10)
	for _, c := range []struct {
		off     uint64
		n, want int
	}{
		{0, 100, 100},
		{1000, 200 << 10, 200 << 10},
		{uint64(len(data)) - 10, 1000, 10},      // cut short: 1000 takes two bytes of length, 10 one
		{uint64(len(data)) - 200, 1 << 20, 200}, // three bytes, then two
		{uint64(len(data)), 100, 0},
	} {
		bt := &batcher{p: p, ctx: context.Background()}
		bt.add(&wire.Op{Code: wire.OpMkdir, Path: "d", Mode: 0o755})
		before := len(bt.raw)
		got, err := bt.addRead("dir/f", f, c.off, c.n)
		if got != c.want || (got < c.n) != (err != nil) {
			t.Fatalf("addRead(%d, %d) = %d, %v; want %d", c.off, c.n, got, err, c.want)
		}
		want := bt.raw[:before]
		if got > 0 {
			want = wire.AppendOp(append([]byte(nil), want...), &wire.Op{Code: wire.OpWrite, Path: "dir/f", Off: c.off, Data: data[c.off : c.off+uint64(got)]})
		}
		if !bytes.Equal(bt.raw, want) {
			t.Fatalf("addRead(%d, %d): the batch differs from AppendOp's", c.off, c.n)
		}
		ops, err := wire.DecodeOps(bt.raw[wire.HeaderSize:])
		if err != nil || len(ops) != 1+min(got, 1) {
			t.Fatalf("addRead(%d, %d): %d ops decoded, %v", c.off, c.n, len(ops), err)
		}
	}
}

// The spare frames of a burst of big batches, and the batcher's buffer,
// are let go after keepSmall small batches; kept through fewer.
func TestSparesLetGoAfterABurst(t *testing.T) {
	p := unconnectedPrimary(t)
	bt := &batcher{p: p, ctx: context.Background()}
	f, _ := randomFile(t, 1<<20)
	for range maxSpares + 1 {
		bigBatch(t, bt, f)
	}
	p.mu.Lock()
	p.ack(p.out.last())
	spares := len(p.out.spares)
	p.mu.Unlock()
	if spares != maxSpares {
		t.Fatalf("%d spares after the burst's acks, want %d", spares, maxSpares)
	}
	for i := range keepSmall {
		bt.add(&wire.Op{Code: wire.OpMkdir, Path: "d", Mode: 0o755})
		bt.flush()
		p.mu.Lock()
		spares = len(p.out.spares)
		p.mu.Unlock()
		if i < keepSmall-1 && spares == 0 {
			t.Fatalf("the spares were let go after %d small batches, want %d", i+1, keepSmall)
		}
	}
	if spares != 0 || cap(bt.raw) > batchKeep {
		t.Fatalf("%d spares and %d bytes of room kept after %d small batches", spares, cap(bt.raw), keepSmall)
	}
}

// Small batches (a durability call's 4 KiB) cost little memory: no
// frameRoom buffer is made for them, not after keepSmall of them either
// (a version made one for every batch once the spares were let go: 2
// MiB to allocate and clear for each 4 KiB write).
func TestSmallBatchesAllocateLittle(t *testing.T) {
	p := unconnectedPrimary(t)
	bt := &batcher{p: p, ctx: context.Background()}
	f, _ := randomFile(t, 1<<20)
	bigBatch(t, bt, f) // a burst first: its spares, then small batches
	const n = 4 * keepSmall
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := range n {
		bt.flushIfFull(4096 + 1)
		bt.addRead("f", f, uint64(i%256)*4096, 4096)
		bt.flush()
		p.mu.Lock()
		p.ack(p.out.last())
		p.mu.Unlock()
	}
	runtime.ReadMemStats(&after)
	if per := (after.TotalAlloc - before.TotalAlloc) / n; per > 64<<10 {
		t.Fatalf("%d bytes allocated a 4 KiB batch", per)
	}
}

// A sync of many small files (create, data, setattr per file, through
// builder.ship as a pass does) fills batches of a megabyte or more, as
// before frames were built in place. A version flushed a batch of 128 KiB
// or more whenever a read did not fit its buffer: 136 KiB batches, 23
// times as many, each with an ack and a state save on the peer (from a
// review).
func TestSmallFilesFillBatches(t *testing.T) {
	p := unconnectedPrimary(t)
	bt := &batcher{p: p, ctx: context.Background()}
	b := &builder{out: bt, buf: make([]byte, readChunk)}
	dir := t.TempDir()
	const files, size = 3000, 4 << 10
	var raw, wireBytes int
	for i := range files {
		name := fmt.Sprintf("src/pkg/module%03d/file%05d.go", i/100, i)
		text := []byte(strings.Repeat(fmt.Sprintf("// line of file %d of the tree\n", i), 1+(i*7919)%(size/16)))
		path := filepath.Join(dir, fmt.Sprint(i))
		if err := os.WriteFile(path, text, 0o644); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		bt.add(&wire.Op{Code: wire.OpCreate, Path: name, Mode: 0o644})
		if err := b.ship(name, f, journal.Span{Off: 0, End: uint64(len(text))}); err != nil {
			t.Fatal(err)
		}
		f.Close()
		bt.add(&wire.Op{Code: wire.OpSetattr, Path: name, Mode: 0o644, Mtime: 1700000000123456789, Atime: 1700000000123456789})
		raw += len(text) + 2*len(name)
		p.mu.Lock()
		for _, sb := range p.out.batches {
			wireBytes += len(sb.frame)
		}
		p.ack(p.out.last())
		p.mu.Unlock()
	}
	bt.flush()
	for _, sb := range p.out.batches {
		wireBytes += len(sb.frame)
	}
	batches := int(p.out.last())
	t.Logf("%d KiB in %d batches, %d KiB on the wire; room %d", raw>>10, batches, wireBytes>>10, cap(bt.raw))
	if max := raw/(1<<20) + 1; batches > max {
		t.Fatalf("%d KiB of small files went in %d batches (%d KiB each); want at most %d (batches of 1 MiB or more)", raw>>10, batches, raw>>10/batches, max)
	}
}

// A sync of small incompressible files (photos) ships, per file, a create
// op, its data (flushIfFull then addRead, as shipUpTo does) and a setattr
// op (add). A read that fits the frameRoom buffer can leave less room
// than the ops add appends after it (long paths): add grew the buffer
// past frameRoom (a copy of about 2 MiB), and that batch and the later
// ones went as copies. Every big batch that goes as it is is built in
// place, but the first, which may come from a buffer grown for the
// compressed batches before it (from a review).
func TestAddKeepsFrameRoom(t *testing.T) {
	p := unconnectedPrimary(t)
	bt := &batcher{p: p, ctx: context.Background()}
	f, _ := randomFile(t, 8<<20)
	rng := mrand.New(mrand.NewPCG(1, 2))
	big, inPlace, maxRoom := 0, 0, 0
	for i := range 5000 {
		name := fmt.Sprintf("photos/2024/some-rather-long-album-name/with/several/levels/of/directories/and/a/long/file/name/IMG_%06d_edited_final_v2.jpg", i)
		n := 16<<10 + rng.IntN(48<<10) // the paths, 1 % of it: the batches go as they are
		bt.add(&wire.Op{Code: wire.OpCreate, Path: name, Mode: 0o644})
		bt.flushIfFull(n + len(name))
		if got, err := bt.addRead(name, f, uint64(rng.IntN(7<<20)), n); got != n {
			t.Fatalf("addRead: %d, %v", got, err)
		}
		bt.flushIfFull(0)
		bt.add(&wire.Op{Code: wire.OpSetattr, Path: name, Mode: 0o644, UID: 1000, GID: 1000, Mtime: 1700000000123456789, Atime: 1700000000123456789})
		p.mu.Lock()
		for _, b := range p.out.batches {
			if fr, _, _ := wire.ParseHeader(b.frame); fr.Flags&wire.FlagZstd == 0 && len(b.frame)-wire.HeaderSize >= 2*compressSample {
				big++
				if b.buf != nil {
					inPlace++
				} else if cap(bt.raw) > maxRoom {
					maxRoom = cap(bt.raw)
				}
			}
		}
		p.ack(p.out.last())
		p.mu.Unlock()
	}
	if big < 50 || inPlace < big-1 {
		t.Fatalf("%d of %d big incompressible batches built in place; the batcher's buffer grew to %d (frameRoom %d)", inPlace, big, maxRoom, frameRoom)
	}
}

// An op add appends to a batch in a frameRoom buffer that it would not
// fit in sends the batch first: the buffer is not grown (a copy of 2 MiB,
// and the batch copied into its frame). From a review.
func TestAddDoesNotGrowFrameRoom(t *testing.T) {
	p := unconnectedPrimary(t)
	bt := &batcher{p: p, ctx: context.Background()}
	f, _ := randomFile(t, 2<<20)
	bt.flushIfFull(1<<20 + 1)
	bt.addRead("f", f, 0, 1<<20)
	if cap(bt.raw) != frameRoom {
		t.Fatalf("a 1 MiB read went into a buffer of %d, want frameRoom", cap(bt.raw))
	}
	// A read that leaves less room than the long name's next op needs.
	name := strings.Repeat("d/", 100) + "f"
	n := cap(bt.raw) - len(bt.raw) - len(name) - opSlack
	bt.flushIfFull(n + len(name))
	if got, err := bt.addRead(name, f, 0, n); got != n || cap(bt.raw) != frameRoom {
		t.Fatalf("addRead: %d, %v, room %d", got, err, cap(bt.raw))
	}
	bt.add(&wire.Op{Code: wire.OpSetattr, Path: name, Mode: 0o644, UID: 1000, GID: 1000, Mtime: 1700000000123456789, Atime: 1700000000123456789})
	if cap(bt.raw) > frameRoom {
		t.Fatalf("add grew the batch's buffer to %d (frameRoom %d)", cap(bt.raw), frameRoom)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.out.batches) != 1 || p.out.batches[0].buf == nil {
		t.Fatalf("%d batches queued, the first built in place: %v", len(p.out.batches), len(p.out.batches) == 1 && p.out.batches[0].buf != nil)
	}
}

// A tree of big files that compress (logs, dumps) and big ones that do not
// (their .gz), in turn, as a resync reads it: a compressed batch follows
// every one that went as it is. A version let go of the buffer grown for
// the compressed batches after each batch that went as it is, and the
// next compressed one grew a new one twice (2 -> 3.2 -> 5 MiB): 9.6 MiB
// allocated a pair besides the frames, against 1.7 MiB at 429ed9a (from a
// review).
func TestMixedBatchesDoNotRegrowTheirBuffer(t *testing.T) {
	p := unconnectedPrimary(t)
	bt := &batcher{p: p, ctx: context.Background()}
	b := &builder{out: bt, buf: make([]byte, readChunk)}
	const size = 4 << 20
	ft, _ := textFile(t, size)
	fn, _ := randomFile(t, size)
	copied := 0
	ship := func(i int) {
		f, name := ft, fmt.Sprintf("logs/app.%03d.log", i)
		if i%2 == 1 {
			f, name = fn, fmt.Sprintf("logs/app.%03d.log.gz", i)
		}
		bt.add(&wire.Op{Code: wire.OpCreate, Path: name, Mode: 0o644})
		if err := b.ship(name, f, journal.Span{Off: 0, End: size}); err != nil {
			t.Fatal(err)
		}
		bt.flush()
		p.mu.Lock()
		for _, sb := range p.out.batches {
			if sb.buf == nil {
				copied += len(sb.frame)
			}
		}
		p.ack(p.out.last())
		p.mu.Unlock()
	}
	ship(0) // the first compressed batch grows the buffer: not counted
	ship(1)
	copied = 0
	const pairs = 8
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := 2; i < 2+2*pairs; i++ {
		ship(i)
	}
	runtime.ReadMemStats(&after)
	extra := int(after.TotalAlloc-before.TotalAlloc) - copied
	t.Logf("%d batches, %d MiB of frames copied, %d KiB allocated besides, a pair", p.out.last(), copied/pairs>>20, extra/pairs>>10)
	if extra/pairs > frameRoom {
		t.Fatalf("a compressed and an incompressible batch allocated %d KiB besides their frames' copies; want at most frameRoom (%d KiB)", extra/pairs>>10, frameRoom>>10)
	}
}

// Durability calls of a writer of incompressible data (an encrypted or
// compressed database) in 4 KiB pages, 132 to 240 KiB between calls: each
// batch is built from reads of 4 KiB. At 429ed9a a batch allocated about
// its size (its frame's copy). A version moved such a batch into a
// frameRoom buffer at 128 KiB and, its buffer in flight, regrew the next
// from nothing: 558 to 688 KiB a batch (from a review). Below
// inPlaceFrom, a batch of small reads keeps a buffer of its own.
func TestMediumIncompressibleBatchesAllocateLittle(t *testing.T) {
	f, _ := randomFile(t, 1<<20)
	for _, kib := range []int{132, 160, 240} {
		p := unconnectedPrimary(t)
		bt := &batcher{p: p, ctx: context.Background()}
		batch := func() {
			for off := 0; off < kib<<10; off += 4096 {
				bt.flushIfFull(4096 + 1)
				bt.addRead("f", f, uint64(off), 4096)
				bt.flushIfFull(0)
			}
			bt.flush()
			p.mu.Lock()
			p.ack(p.out.last()) // the durability call's wait
			p.mu.Unlock()
		}
		batch()
		const n = 100
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for range n {
			batch()
		}
		runtime.ReadMemStats(&after)
		if per := int(after.TotalAlloc-before.TotalAlloc) / n; per > 2*kib<<10 {
			t.Errorf("a %d KiB batch allocated %d KiB; want at most twice its size", kib, per>>10)
		}
	}
}

// The batcher ships every op whole and in order, whatever mix it gets:
// ops added with their data (up to 200 KiB), long paths, reads straight
// into the batch of up to 3 MiB of data that compresses or not, some past
// the end of the file, flushes at random; a real sender writes the frames
// to a pipe whose reader acknowledges each as it decodes it, so that
// buffers are reused while the batcher runs. Every op read back is
// compared with what was added (from a review).
func TestBatcherShipsEveryOpInOrder(t *testing.T) {
	seeds, steps := []uint64{1, 2, 3, 4}, 3000
	if raceEnabled {
		seeds, steps = seeds[:1], 500 // the race detector's pace
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { shipEveryOp(t, seed, steps) })
	}
}

func shipEveryOp(t *testing.T, seed uint64, steps int) {
	p := unconnectedPrimary(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	bt := &batcher{p: p, ctx: ctx}
	b := &builder{out: bt, buf: make([]byte, readChunk)}
	fn, noise := randomFile(t, 6<<20)
	ft, text := textFile(t, 6<<20)
	a, c := net.Pipe()
	got := make(chan []wire.Op, 1)
	go func() {
		r := bufio.NewReaderSize(c, 1<<16)
		var ops []wire.Op
		for {
			fr, err := wire.ReadSealedFrame(r, nil)
			if err != nil {
				got <- ops
				return
			}
			if fr.Type != wire.TypeBatch {
				continue
			}
			pl, err := wire.Payload(&fr, nil)
			if err != nil {
				t.Error(err)
			}
			o, err := wire.DecodeOps(pl)
			if err != nil {
				t.Errorf("batch %d: %v", fr.Seq, err)
			}
			for i := range o {
				o[i].Data = append([]byte(nil), o[i].Data...)
			}
			ops = append(ops, o...)
			p.mu.Lock()
			p.ack(fr.Seq)
			p.work.Broadcast()
			p.mu.Unlock()
		}
	}()
	errc := make(chan error, 1)
	go func() { errc <- p.writeBatches(ctx, a, 0, true) }()

	rng := mrand.New(mrand.NewPCG(seed, 7))
	var want []wire.Op
	for i := range steps {
		name := fmt.Sprintf("dir/%d/file%05d", rng.IntN(50), i)
		switch rng.IntN(4) {
		case 0:
			d := noise[:rng.IntN(200<<10)]
			op := wire.Op{Code: wire.OpWrite, Path: name, Off: uint64(i), Data: d}
			bt.add(&op)
			want = append(want, op)
		case 1:
			op := wire.Op{Code: wire.OpSetattr, Path: strings.Repeat("x/", rng.IntN(300)) + name, Mode: 0o644, Mtime: int64(i)}
			bt.add(&op)
			want = append(want, op)
		default:
			f, src := fn, noise
			if rng.IntN(3) == 0 {
				f, src = ft, text
			}
			off := uint64(rng.IntN(len(src) + 4096))
			n := uint64(1 + rng.IntN(3<<20))
			if rng.IntN(3) == 0 {
				n = uint64(1 + rng.IntN(8192))
			}
			b.ship(name, f, journal.Span{Off: off, End: off + n})
			for o := off; o < off+n && o < uint64(len(src)); {
				e := min(o+readChunk, off+n, uint64(len(src)))
				want = append(want, wire.Op{Code: wire.OpWrite, Path: name, Off: o, Data: src[o:e]})
				o = e
			}
		}
		if rng.IntN(20) == 0 {
			bt.flush()
		}
	}
	bt.flush()
	// Wait for every batch to be acknowledged, then end.
	p.mu.Lock()
	for !p.out.empty() {
		p.work.Wait()
	}
	p.mu.Unlock()
	cancel()
	p.wake()
	p.mu.Lock()
	p.sendq.Broadcast()
	p.mu.Unlock()
	<-errc
	a.Close()
	ops := <-got
	if len(ops) != len(want) {
		t.Fatalf("%d ops received, want %d", len(ops), len(want))
	}
	for i := range ops {
		g, w := ops[i], want[i]
		if g.Code != w.Code || g.Path != w.Path || g.Off != w.Off || !bytes.Equal(g.Data, w.Data) || g.Mtime != w.Mtime {
			t.Fatalf("op %d: got %v %s off %d len %d, want %v %s off %d len %d", i, g.Code, g.Path, g.Off, len(g.Data), w.Code, w.Path, w.Off, len(w.Data))
		}
	}
	t.Logf("%d ops, %d batches", len(ops), p.out.last())
}
