// Package faultnet injects one-way packet loss into the lab's networks.
//
// A Dropper is a BPF program attached at an interface's TCX ingress hook. It
// drops the IPv4 frames whose source address has a loss rule, each with the
// rule's probability, and the ARP frames whose sender address has one: a
// fault that hides a peer's packets hides its ARP replies too, as a broken
// link would. Frames of other sources, and every frame the interface sends,
// pass untouched.
//
// TCX rather than XDP: both load on this kernel's veths, but a TCX program
// is one of many on the hook (an XDP program owns the interface's only
// slot), and attaching it leaves the veth's receive path as it is, where an
// XDP program switches the veth to NAPI mode and may copy frames. The
// program is detached when the Dropper is closed, or when the process exits.
//
// The kernel has no netem, tc classifiers or netfilter here, which is why the
// lab needs its own injector.
package faultnet

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Dropper drops frames by source address at one interface's ingress.
// Its methods may be called from any goroutine, and in any network
// namespace: only Attach depends on the caller's namespace.
type Dropper struct {
	ifname string
	objs   faultnetObjects
	link   link.Link
}

// Attach loads the program and attaches it at the ingress of the interface
// named ifname in the calling thread's network namespace. No rule is set:
// every frame passes until Drop is called. To attach in another namespace,
// use AttachInNetns, or call Attach from a goroutine locked to a thread that
// entered that namespace.
func Attach(ifname string) (*Dropper, error) {
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("faultnet: interface %q: %w", ifname, err)
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("faultnet: raising memlock limit: %w", err)
	}
	d := &Dropper{ifname: ifname}
	if err := loadFaultnetObjects(&d.objs, nil); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("faultnet: loading the BPF program (verifier): %+v", verr)
		}
		return nil, fmt.Errorf("faultnet: loading the BPF program: %w", err)
	}
	d.link, err = link.AttachTCX(link.TCXOptions{
		Interface: iface.Index,
		Program:   d.objs.FaultnetIngress,
		Attach:    ebpf.AttachTCXIngress,
	})
	if err != nil {
		d.objs.Close()
		return nil, fmt.Errorf("faultnet: attaching at the TCX ingress of %s (needs Linux 6.6 or later): %w", ifname, err)
	}
	return d, nil
}

// AttachInNetns attaches a Dropper at the ingress of the interface ifname
// in the network namespace nsName, as named by `ip netns` (/run/netns/nsName).
// The returned Dropper stays attached there; the caller's thread does not
// change namespace.
func AttachInNetns(nsName, ifname string) (*Dropper, error) {
	var d *Dropper
	err := InNetns(nsName, func() error {
		var err error
		d, err = Attach(ifname)
		return err
	})
	return d, err
}

// InNetns runs fn on a thread that entered the network namespace nsName
// (/run/netns/nsName), then returns that thread to its namespace. Sockets
// and links that fn creates stay in nsName and may be used from any
// goroutine afterwards; goroutines that fn starts do not run in nsName.
func InNetns(nsName string, fn func() error) error {
	target, err := os.Open(filepath.Join("/run/netns", nsName))
	if err != nil {
		return fmt.Errorf("faultnet: network namespace %q (create it with ip netns add): %w", nsName, err)
	}
	defer target.Close()
	done := make(chan error, 1)
	// A goroutine of its own, so that the caller's thread never changes
	// namespace, even when fn panics or the return fails.
	go func() {
		runtime.LockOSThread()
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("faultnet: opening this thread's network namespace: %w", err)
			return
		}
		defer home.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("faultnet: entering network namespace %q: %w", nsName, err)
			return
		}
		fnErr := fn()
		if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err != nil {
			// The thread stays locked: the runtime then ends it with this
			// goroutine instead of running other goroutines in nsName.
			done <- errors.Join(fnErr, fmt.Errorf("faultnet: leaving network namespace %q: %w", nsName, err))
			return
		}
		runtime.UnlockOSThread()
		done <- fnErr
	}()
	return <-done
}

// Drop makes the Dropper drop each frame from src with probability fraction,
// from 0 (none) to 1 (all), replacing src's previous rule. src must be an
// IPv4 address.
func (d *Dropper) Drop(src netip.Addr, fraction float64) error {
	key, err := sourceKey(src)
	if err != nil {
		return err
	}
	threshold, err := thresholdOf(fraction)
	if err != nil {
		return err
	}
	if err := d.objs.Loss.Put(key, threshold); err != nil {
		return fmt.Errorf("faultnet: setting the loss of %s on %s: %w", src, d.ifname, err)
	}
	return nil
}

// Heal removes src's rule: its frames pass again. Healing a source that has
// no rule does nothing. The source's drop count is kept.
func (d *Dropper) Heal(src netip.Addr) error {
	key, err := sourceKey(src)
	if err != nil {
		return err
	}
	if err := d.objs.Loss.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("faultnet: healing %s on %s: %w", src, d.ifname, err)
	}
	return nil
}

// Dropped returns how many frames from src (IPv4 and ARP) the Dropper has
// dropped since it was attached.
func (d *Dropper) Dropped(src netip.Addr) (uint64, error) {
	key, err := sourceKey(src)
	if err != nil {
		return 0, err
	}
	var perCPU []uint64
	if err := d.objs.Dropped.Lookup(key, &perCPU); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return 0, nil
		}
		return 0, fmt.Errorf("faultnet: reading the drop count of %s on %s: %w", src, d.ifname, err)
	}
	var n uint64
	for _, c := range perCPU {
		n += c
	}
	return n, nil
}

// Close detaches the program: every frame passes again.
func (d *Dropper) Close() error {
	return errors.Join(d.link.Close(), d.objs.Close())
}

// sourceKey is src as the program's maps key it: the address's four bytes
// in network order.
func sourceKey(src netip.Addr) ([4]byte, error) {
	src = src.Unmap()
	if !src.Is4() {
		return [4]byte{}, fmt.Errorf("faultnet: source %s: only IPv4 sources can be dropped", src)
	}
	return src.As4(), nil
}

// thresholdOf maps a drop probability to the program's threshold, which it
// compares with a uniform random uint32 (all ones: every frame).
func thresholdOf(fraction float64) (uint32, error) {
	if !(fraction >= 0 && fraction <= 1) {
		return 0, fmt.Errorf("faultnet: drop fraction %v: must be from 0 to 1", fraction)
	}
	if fraction == 1 {
		return math.MaxUint32, nil
	}
	return uint32(fraction * (1 << 32)), nil
}
