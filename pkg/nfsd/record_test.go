package nfsd

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"reflect"
	"strings"
	"testing"
)

func TestRecordRoundTrip(t *testing.T) {
	recs := []record{
		{kind: kindHeader, gen: 7, key: bytes.Repeat([]byte{3}, keyLen)},
		set(2, rootID, "a"),
		{kind: kindEnd, count: 1},
		move(2, rootID, "a", 5, strings.Repeat("n", 255), 9),
		del(2),
	}
	var b []byte
	for _, r := range recs {
		b = r.encode(b)
	}
	got, n := decodeAll(b)
	if n != len(b) || !reflect.DeepEqual(got, recs) {
		t.Fatalf("decoded %d of %d bytes: %+v, want %+v", n, len(b), got, recs)
	}
}

// TestDecodeStopsAtDamage: decoding stops at the first frame that is not
// whole and correct, keeping what came before, whatever the damage.
func TestDecodeStopsAtDamage(t *testing.T) {
	good := set(2, rootID, "a").encode(nil)
	frame := func(payload []byte) []byte {
		b := binary.LittleEndian.AppendUint32(nil, uint32(len(payload)))
		b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(payload, castagnoli))
		return append(b, payload...)
	}
	setPayload := set(3, rootID, "b").encode(nil)[frameLen:]
	for name, tail := range map[string][]byte{
		"nothing":             nil,
		"part of a header":    {5, 0, 0},
		"zero length":         make([]byte, 40),
		"too long":            frame(make([]byte, maxPayload+1)),
		"payload cut":         set(3, rootID, "b").encode(nil)[:frameLen+5],
		"checksum wrong":      append(binary.LittleEndian.AppendUint32(nil, uint32(len(setPayload))), append([]byte{1, 2, 3, 4}, setPayload...)...),
		"unknown kind":        frame([]byte{99, 1, 2}),
		"bytes left over":     frame(append(append([]byte(nil), setPayload...), 0)),
		"name longer than it": frame(setPayload[:len(setPayload)-1]),
		"empty name":          frame(set(3, rootID, "").encode(nil)[frameLen:]),
		"bad magic":           frame(append([]byte{byte(kindHeader)}, make([]byte, len(magic)+8+keyLen)...)),
	} {
		b := append(append([]byte(nil), good...), tail...)
		got, n := decodeAll(b)
		if n != len(good) || len(got) != 1 || got[0].id != 2 {
			t.Errorf("%s: decoded %d records, %d bytes; want the 1 good record, %d bytes", name, len(got), n, len(good))
		}
	}
}
