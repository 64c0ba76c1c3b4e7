package replica

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// TestFrameReaderOrderAndBuffers: frames come out in order, whole, large
// and small, compressed or not, with the read's error after the last
// whole frame; a frame's payload and ops stay as read until the next call
// (the next frame is read into the other slot meanwhile).
func TestFrameReaderOrderAndBuffers(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var stream bytes.Buffer
	type sent struct {
		typ  wire.Type
		seq  uint64
		data []byte
	}
	var want []sent
	for seq := uint64(1); seq <= 200; seq++ {
		if seq%7 == 0 {
			stream.Write(wire.AppendFrame(nil, &wire.Frame{Type: wire.TypeSync, Seq: seq}))
			want = append(want, sent{typ: wire.TypeSync, seq: seq})
			continue
		}
		// Sizes on both sides of aheadMin; random bytes or zeros
		// (compressed well).
		n := rng.IntN(3 * aheadMin)
		data := make([]byte, n)
		if seq%3 != 0 {
			for i := range data {
				data[i] = byte(rng.Uint32())
			}
		}
		raw := wire.AppendOp(nil, &wire.Op{Code: wire.OpWrite, Path: fmt.Sprintf("f%d", seq), Off: seq, Data: data})
		f := &wire.Frame{Type: wire.TypeBatch, Seq: seq, Payload: raw}
		if seq%2 == 0 {
			f.Flags, f.Payload = wire.FlagZstd, wire.Compress(nil, raw)
		}
		stream.Write(wire.AppendFrame(nil, f))
		want = append(want, sent{typ: wire.TypeBatch, seq: seq, data: data})
	}
	// A torn frame at the end: its error comes after every whole one.
	stream.Write(wire.AppendFrame(nil, &wire.Frame{Type: wire.TypeBatch, Seq: 999, Payload: make([]byte, 100)})[:50])

	fr := newFrameReader(bufio.NewReaderSize(&stream, 1<<20), wire.ReadFrame)
	for i, w := range want {
		rf := fr.next()
		if rf.err != nil || rf.decodeErr != nil {
			t.Fatalf("frame %d (seq %d): %v / %v", i, w.seq, rf.err, rf.decodeErr)
		}
		if rf.f.Type != w.typ || rf.f.Seq != w.seq {
			t.Fatalf("frame %d: got %s seq %d, want %s seq %d", i, rf.f.Type, rf.f.Seq, w.typ, w.seq)
		}
		if w.typ != wire.TypeBatch {
			continue
		}
		if len(rf.ops) != 1 || rf.ops[0].Path != fmt.Sprintf("f%d", w.seq) || rf.ops[0].Off != w.seq || !bytes.Equal(rf.ops[0].Data, w.data) {
			t.Fatalf("frame %d (seq %d): ops differ from those sent", i, w.seq)
		}
		// The next frame may be read meanwhile: into the other slot.
		payload := bytes.Clone(rf.f.Payload)
		time.Sleep(100 * time.Microsecond)
		if !bytes.Equal(rf.ops[0].Data, w.data) || !bytes.Equal(rf.f.Payload, payload) {
			t.Fatalf("frame %d (seq %d): its data changed before the next call", i, w.seq)
		}
	}
	rf := fr.next()
	if rf.err == nil || !errors.Is(rf.err, io.ErrUnexpectedEOF) && !errors.Is(rf.err, wire.ErrBadFrame) {
		t.Fatalf("after the last whole frame: err %v, want the torn frame's", rf.err)
	}
}

// manyCreates is a batch's n creates of long names: a batch of over 64 KiB
// (aheadMin) that takes a while to apply.
func manyCreates(n int) []wire.Op {
	ops := make([]wire.Op, 0, n)
	for i := range n {
		ops = append(ops, wire.Op{Code: wire.OpCreate, Path: fmt.Sprintf("f%05d_%s", i, strings.Repeat("x", 90)), Mode: 0o644})
	}
	return ops
}

// A frame read (ahead) while a large batch applies, after SetAccept(false),
// is not applied; the last durable ack covers only the large batch.
func TestFrameReadAheadNotAppliedAfterAcceptOff(t *testing.T) {
	s := newTestSecondary(t, filepath.Join(t.TempDir(), "state"))
	p := s.connect(t, 7)
	p.batch(1, manyCreates(3000)...)
	p.batch(2, wire.Op{Code: wire.OpCreate, Path: "late", Mode: 0o644})
	ch := p.next()
	time.Sleep(30 * time.Millisecond)
	select {
	case g := <-ch:
		t.Skipf("batch 1 (3000 creates) was applied within 30 ms, before SetAccept(false) could come during it: %v %v", g.f.Type, g.f.Seq)
	default:
	}
	s.SetAccept(false)
	g := <-ch
	t.Logf("1st: %s seq %d flags %#x err %v", g.f.Type, g.f.Seq, g.f.Flags, g.err)
	for {
		f, err := p.read()
		if err != nil {
			t.Logf("end: %v", err)
			break
		}
		t.Logf("then: %s seq %d flags %#x", f.Type, f.Seq, f.Flags)
	}
	if _, err := os.Lstat(filepath.Join(s.data, "late")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("batch 2 applied after SetAccept(false): %v", err)
	}
}

// After a large batch is refused (apply error), the prefetch goroutine,
// blocked in a read, ends: handle closes the connection.
func TestFrameReadAheadEndsWithConnection(t *testing.T) {
	s := newTestSecondary(t, filepath.Join(t.TempDir(), "state"))
	p := s.connect(t, 7)
	ops := append(manyCreates(1000), wire.Op{Code: wire.OpRename, Path: "missing", Path2: "other"})
	p.batch(1, ops...)
	f, err := p.read()
	t.Logf("got %s %q %v", f.Type, f.Payload, err)
	// The primary keeps the connection open and sends nothing.
	deadline := time.Now().Add(2 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		st := string(buf[:runtime.Stack(buf, true)])
		if !strings.Contains(st, "readInto") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("prefetch goroutine still running:\n%s", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := p.read(); err == nil {
		t.Fatal("connection still open")
	}
}
