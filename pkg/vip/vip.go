// Package vip moves the cluster's virtual IP: netlink adds and removes
// it, gratuitous ARP announces it, and an ARP probe (duplicate address
// detection) tells whether another host still answers for it.
package vip

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// VIP is a virtual IPv4 address on an interface.
type VIP struct {
	Prefix netip.Prefix // address and prefix length, e.g. 10.250.0.100/24
	Iface  string
}

func (v VIP) String() string { return v.Prefix.String() + " on " + v.Iface }

func (v VIP) link() (netlink.Link, error) {
	l, err := netlink.LinkByName(v.Iface)
	if err != nil {
		return nil, fmt.Errorf("vip interface %q: %w (is it the right name on this host? see `ip link`)", v.Iface, err)
	}
	return l, nil
}

func (v VIP) addr() *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: v.Prefix.Addr().AsSlice(), Mask: net.CIDRMask(v.Prefix.Bits(), 32)}}
}

// Check verifies that the interface exists and is up.
func (v VIP) Check() error {
	l, err := v.link()
	if err != nil {
		return err
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("vip interface %q is down", v.Iface)
	}
	return nil
}

// Held reports whether this host has the address.
func (v VIP) Held() (bool, error) {
	l, err := v.link()
	if err != nil {
		return false, err
	}
	addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		return false, fmt.Errorf("listing addresses of %q: %w", v.Iface, err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == v.Prefix.Addr() {
			return true, nil
		}
	}
	return false, nil
}

// Add puts the address on the interface (no error if already there).
func (v VIP) Add() error {
	l, err := v.link()
	if err != nil {
		return err
	}
	if err := netlink.AddrAdd(l, v.addr()); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("adding %s: %w", v, err)
	}
	return nil
}

// Remove takes the address off the interface, with whatever prefix
// length it has there (no error if absent), and checks it is gone. The
// kernel deletes an address only with its own prefix length and answers
// EADDRNOTAVAIL otherwise: one left as /32 by a crash under an older
// configuration, or added by hand, stayed while Remove said it was gone,
// and the peer's probe found the VIP held for ever (TestRemoveAnyPrefix,
// from a review).
func (v VIP) Remove() error {
	l, err := v.link()
	if err != nil {
		return err
	}
	addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("listing addresses of %q: %w", v.Iface, err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); !ok || ip.Unmap() != v.Prefix.Addr() {
			continue
		}
		if err := netlink.AddrDel(l, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("removing %s (%s): %w", v, a.IPNet, err)
		}
	}
	held, err := v.Held()
	if err != nil {
		return err
	}
	if held {
		return fmt.Errorf("removing %s: the address is still on %s", v, v.Iface)
	}
	return nil
}

func (v VIP) dial() (*arp.Client, *net.Interface, error) {
	ifi, err := net.InterfaceByName(v.Iface)
	if err != nil {
		return nil, nil, fmt.Errorf("vip interface %q: %w", v.Iface, err)
	}
	c, err := arp.Dial(ifi)
	if err != nil {
		return nil, nil, fmt.Errorf("ARP on %q: %w", v.Iface, err)
	}
	return c, ifi, nil
}

// Announce sends count gratuitous ARPs, spacing apart, so that switches
// and neighbours learn the address's new hardware address at once.
func (v VIP) Announce(ctx context.Context, count int, spacing time.Duration) error {
	c, ifi, err := v.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	ip := v.Prefix.Addr()
	p, err := arp.NewPacket(arp.OperationRequest, ifi.HardwareAddr, ip, ethernet.Broadcast, ip)
	if err != nil {
		return err
	}
	for i := 0; i < count; i++ {
		if i > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(spacing):
			}
		}
		if err := c.WriteTo(p, ethernet.Broadcast); err != nil {
			return fmt.Errorf("gratuitous ARP for %s: %w", v, err)
		}
	}
	return nil
}

// Probe asks, as duplicate address detection does (sender address
// 0.0.0.0), who has the address, and returns the hardware address of the
// first other host that answers within wait, or nil.
func (v VIP) Probe(wait time.Duration) (net.HardwareAddr, error) {
	owners, err := v.probe(wait, true)
	if len(owners) > 0 {
		return owners[0], err
	}
	return nil, err
}

// Responders probes for wait and returns every other host that answered.
func (v VIP) Responders(wait time.Duration) ([]net.HardwareAddr, error) {
	return v.probe(wait, false)
}

func (v VIP) probe(wait time.Duration, first bool) ([]net.HardwareAddr, error) {
	var owners []net.HardwareAddr
	c, ifi, err := v.dial()
	if err != nil {
		return nil, err
	}
	defer c.Close()
	ip := v.Prefix.Addr()
	p, err := arp.NewPacket(arp.OperationRequest, ifi.HardwareAddr, netip.IPv4Unspecified(), ethernet.Broadcast, ip)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(wait)
	const probes = 3
	next := time.Now()
	sent := 0
	for time.Now().Before(deadline) {
		if sent < probes && !time.Now().Before(next) {
			if err := c.WriteTo(p, ethernet.Broadcast); err != nil {
				return nil, fmt.Errorf("ARP probe for %s: %w", v, err)
			}
			sent++
			next = time.Now().Add(wait / (probes + 1))
		}
		rd := deadline
		if sent < probes && next.Before(rd) {
			rd = next
		}
		c.SetReadDeadline(rd)
		got, _, err := c.Read()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			// Frames that are not ARP are skipped by the client; other
			// errors end the probe.
			if errors.Is(err, arp.ErrInvalidHardwareAddr) || errors.Is(err, arp.ErrInvalidIP) {
				continue
			}
			return nil, fmt.Errorf("reading ARP on %q: %w", v.Iface, err)
		}
		if got.SenderIP != ip || got.SenderHardwareAddr.String() == ifi.HardwareAddr.String() {
			continue
		}
		known := false
		for _, o := range owners {
			known = known || o.String() == got.SenderHardwareAddr.String()
		}
		if !known {
			owners = append(owners, got.SenderHardwareAddr)
		}
		if first {
			break
		}
	}
	return owners, nil
}
