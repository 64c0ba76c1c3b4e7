package nfsd

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// A minimal NFSv3 client over ONC RPC (TCP, one fragment per record, AUTH
// NULL). Unlike a kernel client or go-nfs-client it keeps raw handles and
// can be pointed at another server without a new mount, which is what a
// client behind a moving VIP sees.

const (
	progMount = 100005
	progNFS   = 100003

	nfsOK     = 0
	nfsNoEnt  = 2
	nfsAccess = 13
	nfsExist  = 17
	nfsStale  = 70
	nfsNotDir = 20

	unstable = 0
	fileSync = 2
)

type client struct {
	t    *testing.T
	conn net.Conn
	xid  atomic.Uint32
}

func dialNFS(t *testing.T, addr string) *client {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dialing %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return &client{t: t, conn: c}
}

// xdr builds call arguments.
type xdr []byte

func (x xdr) u32(v uint32) xdr { return binary.BigEndian.AppendUint32(x, v) }
func (x xdr) u64(v uint64) xdr { return binary.BigEndian.AppendUint64(x, v) }
func (x xdr) opaque(b []byte) xdr {
	x = x.u32(uint32(len(b)))
	x = append(x, b...)
	for len(x)%4 != 0 {
		x = append(x, 0)
	}
	return x
}
func (x xdr) str(s string) xdr              { return x.opaque([]byte(s)) }
func (x xdr) dirop(fh []byte, n string) xdr { return x.opaque(fh).str(n) }

// sattr3 with only a mode, or nothing set.
func (x xdr) sattr(mode uint32) xdr {
	if mode != 0 {
		x = x.u32(1).u32(mode)
	} else {
		x = x.u32(0)
	}
	return x.u32(0).u32(0).u32(0).u32(0).u32(0)
}

// reply reads results.
type reply struct {
	b   []byte
	bad bool
}

func (r *reply) u32() uint32 {
	if len(r.b) < 4 {
		r.bad = true
		return 0
	}
	v := binary.BigEndian.Uint32(r.b)
	r.b = r.b[4:]
	return v
}

func (r *reply) u64() uint64 { return uint64(r.u32())<<32 | uint64(r.u32()) }

func (r *reply) opaque() []byte {
	n := int(r.u32())
	p := (n + 3) &^ 3
	if r.bad || len(r.b) < p {
		r.bad = true
		return nil
	}
	v := append([]byte(nil), r.b[:n]...)
	r.b = r.b[p:]
	return v
}

func (r *reply) skip(n int) {
	if len(r.b) < n {
		r.bad = true
		return
	}
	r.b = r.b[n:]
}

// attr is the part of fattr3 the tests look at.
type attr struct {
	typ    uint32
	size   uint64
	fileid uint64
}

func (r *reply) fattr() attr {
	a := attr{typ: r.u32()}
	r.skip(16) // mode, nlink, uid, gid
	a.size = r.u64()
	r.skip(24) // used, rdev, fsid
	a.fileid = r.u64()
	r.skip(24) // times
	return a
}

func (r *reply) postOpAttr() (attr, bool) {
	if r.u32() == 0 {
		return attr{}, false
	}
	return r.fattr(), true
}

func (r *reply) wcc() {
	if r.u32() != 0 {
		r.skip(24)
	}
	r.postOpAttr()
}

// call sends one RPC and returns the results after the accepted header.
func (c *client) call(prog, proc uint32, args xdr) *reply {
	c.t.Helper()
	xid := c.xid.Add(1)
	msg := xdr(nil).u32(xid).u32(0).u32(2).u32(prog).u32(3).u32(proc).
		u32(0).u32(0).u32(0).u32(0) // AUTH_NULL credential and verifier
	msg = append(msg, args...)
	rec := xdr(nil).u32(uint32(len(msg)) | 1<<31)
	c.conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.conn.Write(append(rec, msg...)); err != nil {
		c.t.Fatalf("rpc %d.%d: sending: %v", prog, proc, err)
	}
	var body []byte
	for last := false; !last; {
		var hdr [4]byte
		if _, err := io.ReadFull(c.conn, hdr[:]); err != nil {
			c.t.Fatalf("rpc %d.%d: reading the reply: %v", prog, proc, err)
		}
		n := binary.BigEndian.Uint32(hdr[:])
		last = n&(1<<31) != 0
		frag := make([]byte, n&^(1<<31))
		if _, err := io.ReadFull(c.conn, frag); err != nil {
			c.t.Fatalf("rpc %d.%d: reading the reply: %v", prog, proc, err)
		}
		body = append(body, frag...)
	}
	r := &reply{b: body}
	if got := r.u32(); got != xid {
		c.t.Fatalf("rpc %d.%d: reply xid %d, want %d", prog, proc, got, xid)
	}
	if mt, rs := r.u32(), r.u32(); mt != 1 || rs != 0 {
		c.t.Fatalf("rpc %d.%d: message type %d, reply state %d", prog, proc, mt, rs)
	}
	r.u32()
	r.opaque() // verifier
	if as := r.u32(); as != 0 || r.bad {
		c.t.Fatalf("rpc %d.%d: accept state %d", prog, proc, as)
	}
	return r
}

func (c *client) mount(path string) []byte {
	c.t.Helper()
	fh, st := c.tryMount(path)
	if st != 0 {
		c.t.Fatalf("mount %s: status %d", path, st)
	}
	return fh
}

func (c *client) tryMount(path string) ([]byte, uint32) {
	r := c.call(progMount, 1, xdr(nil).str(path))
	if st := r.u32(); st != 0 {
		return nil, st
	}
	return r.opaque(), 0
}

func (c *client) getattr(fh []byte) (attr, uint32) {
	r := c.call(progNFS, 1, xdr(nil).opaque(fh))
	if st := r.u32(); st != nfsOK {
		return attr{}, st
	}
	return r.fattr(), nfsOK
}

// access returns the rights the server grants of mask.
func (c *client) access(fh []byte, mask uint32) (uint32, uint32) {
	r := c.call(progNFS, 4, xdr(nil).opaque(fh).u32(mask))
	st := r.u32()
	r.postOpAttr()
	if st != nfsOK {
		return 0, st
	}
	return r.u32(), nfsOK
}

func (c *client) readlink(fh []byte) (string, uint32) {
	r := c.call(progNFS, 5, xdr(nil).opaque(fh))
	st := r.u32()
	r.postOpAttr()
	if st != nfsOK {
		return "", st
	}
	return string(r.opaque()), nfsOK
}

func (c *client) fsstat(fh []byte) uint32 {
	return c.call(progNFS, 18, xdr(nil).opaque(fh)).u32()
}

// truncate sets a file's size with SETATTR.
func (c *client) truncate(fh []byte, size uint64) uint32 {
	args := xdr(nil).opaque(fh).u32(0).u32(0).u32(0).u32(1).u64(size).u32(0).u32(0).u32(0)
	return c.call(progNFS, 2, args).u32()
}

func (c *client) lookup(dir []byte, name string) ([]byte, uint32) {
	r := c.call(progNFS, 3, xdr(nil).dirop(dir, name))
	if st := r.u32(); st != nfsOK {
		return nil, st
	}
	return r.opaque(), nfsOK
}

func (c *client) read(fh []byte, off uint64, n uint32) ([]byte, uint32) {
	r := c.call(progNFS, 6, xdr(nil).opaque(fh).u64(off).u32(n))
	st := r.u32()
	r.postOpAttr()
	if st != nfsOK {
		return nil, st
	}
	r.u32() // count
	r.u32() // eof
	return r.opaque(), nfsOK
}

// write returns the stability level the server answered.
func (c *client) write(fh []byte, off uint64, data []byte, stable uint32) (uint32, uint32) {
	r := c.call(progNFS, 7, xdr(nil).opaque(fh).u64(off).u32(uint32(len(data))).u32(stable).opaque(data))
	st := r.u32()
	r.wcc()
	if st != nfsOK {
		return 0, st
	}
	if n := r.u32(); n != uint32(len(data)) {
		c.t.Fatalf("write: %d of %d bytes", n, len(data))
	}
	return r.u32(), nfsOK
}

func (c *client) commit(fh []byte) uint32 {
	r := c.call(progNFS, 21, xdr(nil).opaque(fh).u64(0).u32(0))
	return r.u32()
}

// made decodes the reply of CREATE, MKDIR and SYMLINK.
func made(r *reply) ([]byte, uint32) {
	st := r.u32()
	if st != nfsOK {
		return nil, st
	}
	if r.u32() == 0 {
		return nil, nfsOK
	}
	return r.opaque(), nfsOK
}

func (c *client) create(dir []byte, name string) ([]byte, uint32) {
	return made(c.call(progNFS, 8, xdr(nil).dirop(dir, name).u32(0).sattr(0o644)))
}

func (c *client) mkdir(dir []byte, name string) ([]byte, uint32) {
	return made(c.call(progNFS, 9, xdr(nil).dirop(dir, name).sattr(0o755)))
}

func (c *client) symlink(dir []byte, name, target string) ([]byte, uint32) {
	return made(c.call(progNFS, 10, xdr(nil).dirop(dir, name).sattr(0).str(target)))
}

func (c *client) remove(dir []byte, name string) uint32 {
	return c.call(progNFS, 12, xdr(nil).dirop(dir, name)).u32()
}

func (c *client) rmdir(dir []byte, name string) uint32 {
	return c.call(progNFS, 13, xdr(nil).dirop(dir, name)).u32()
}

func (c *client) rename(fromDir []byte, from string, toDir []byte, to string) uint32 {
	return c.call(progNFS, 14, xdr(nil).dirop(fromDir, from).dirop(toDir, to)).u32()
}

// entry is one READDIRPLUS entry.
type entry struct {
	name   string
	fileid uint64
	fh     []byte
}

// readdirplus lists a whole directory, "." and ".." left out.
func (c *client) readdirplus(dir []byte) ([]entry, uint32) {
	var out []entry
	var cookie, verf uint64
	for {
		r := c.call(progNFS, 17, xdr(nil).opaque(dir).u64(cookie).u64(verf).u32(8192).u32(65536))
		st := r.u32()
		r.postOpAttr()
		if st != nfsOK {
			return nil, st
		}
		verf = r.u64()
		for r.u32() != 0 {
			e := entry{fileid: r.u64(), name: string(r.opaque())}
			cookie = r.u64()
			r.postOpAttr()
			if r.u32() != 0 {
				e.fh = r.opaque()
			}
			if e.name != "." && e.name != ".." {
				out = append(out, e)
			}
		}
		if eof := r.u32(); eof != 0 || r.bad {
			if r.bad {
				c.t.Fatalf("readdirplus: short reply")
			}
			return out, nfsOK
		}
	}
}

func (e entry) String() string { return fmt.Sprintf("%s(%#x)", e.name, e.fileid) }
