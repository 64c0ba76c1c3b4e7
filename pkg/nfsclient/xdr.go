package nfsclient

import (
	"encoding/binary"
	"time"
)

// enc builds XDR (RFC 4506) call arguments.
type enc []byte

func (e enc) u32(v uint32) enc { return binary.BigEndian.AppendUint32(e, v) }
func (e enc) u64(v uint64) enc { return binary.BigEndian.AppendUint64(e, v) }
func (e enc) str(s string) enc { return e.opaque([]byte(s)) }

func (e enc) opaque(b []byte) enc {
	e = e.u32(uint32(len(b)))
	e = append(e, b...)
	for len(e)%4 != 0 {
		e = append(e, 0)
	}
	return e
}

// dirop is diropargs3: a directory's handle and a name in it.
func (e enc) dirop(dir []byte, name string) enc { return e.opaque(dir).str(name) }

// sattr is sattr3: each field set only if given.
func (e enc) sattr(a SetAttr) enc {
	for _, v := range []*uint32{a.Mode, a.UID, a.GID} {
		if v == nil {
			e = e.u32(0)
		} else {
			e = e.u32(1).u32(*v)
		}
	}
	if a.Size == nil {
		e = e.u32(0)
	} else {
		e = e.u32(1).u64(*a.Size)
	}
	for _, t := range []*time.Time{a.Atime, a.Mtime} {
		if t == nil {
			e = e.u32(0) // DONT_CHANGE
		} else {
			e = e.u32(2).u32(uint32(t.Unix())).u32(uint32(t.Nanosecond())) // SET_TO_CLIENT_TIME
		}
	}
	return e
}

// dec reads XDR results. A read past the end marks it bad and yields
// zeros, so a procedure decodes its whole reply and checks once.
type dec struct {
	b   []byte
	bad bool
}

func (d *dec) u32() uint32 {
	if len(d.b) < 4 {
		d.bad = true
		d.b = nil
		return 0
	}
	v := binary.BigEndian.Uint32(d.b)
	d.b = d.b[4:]
	return v
}

func (d *dec) u64() uint64 { return uint64(d.u32())<<32 | uint64(d.u32()) }

func (d *dec) bool() bool { return d.u32() != 0 }

func (d *dec) opaque() []byte {
	n := d.u32()
	if d.bad || uint64(len(d.b)) < (uint64(n)+3)&^3 {
		d.bad = true
		d.b = nil
		return nil
	}
	v := append([]byte{}, d.b[:n]...)
	d.b = d.b[(n+3)&^3:]
	return v
}

func (d *dec) skip(n int) {
	if len(d.b) < n {
		d.bad = true
		d.b = nil
		return
	}
	d.b = d.b[n:]
}

func (d *dec) time() time.Time {
	s, ns := d.u32(), d.u32()
	return time.Unix(int64(s), int64(ns))
}

// fattr reads fattr3.
func (d *dec) fattr() Attr {
	a := Attr{Type: FileType(d.u32()), Mode: d.u32(), Nlink: d.u32(), UID: d.u32(), GID: d.u32(), Size: d.u64()}
	d.skip(8 + 8 + 8) // used, rdev, fsid
	a.Fileid = d.u64()
	a.Atime, a.Mtime, a.Ctime = d.time(), d.time(), d.time()
	return a
}

// postOpAttr reads post_op_attr: nil if the server sent none.
func (d *dec) postOpAttr() *Attr {
	if !d.bool() {
		return nil
	}
	a := d.fattr()
	return &a
}

// wcc skips wcc_data: pre_op_attr (size, mtime, ctime), post_op_attr.
func (d *dec) wcc() {
	if d.bool() {
		d.skip(8 + 8 + 8)
	}
	d.postOpAttr()
}
