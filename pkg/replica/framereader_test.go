package replica

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
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
