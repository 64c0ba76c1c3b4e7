//go:build ignore

// duet faultnet: a TCX ingress program that drops the frames sent by chosen
// IPv4 sources, each source with its own probability, to inject one-way
// packet loss into lab tests (tools/lab/faultnet). ARP frames are dropped by
// their sender address too: a real link fault hides ARP replies as well, so
// the receiver's neighbour entry for the source fails like it would.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define MAX_SOURCES 256

// ARP for IPv4 over Ethernet (RFC 826), as it follows the Ethernet header.
struct arp_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 oper;
	__u8 sha[6];
	__be32 spa;
	__u8 tha[6];
	__be32 tpa;
} __attribute__((packed));

// Longest header the program reads: Ethernet + ARP (an IPv4 header is
// shorter, and its source address ends before byte 34).
#define HEADERS_LEN (sizeof(struct ethhdr) + sizeof(struct arp_ipv4))

// Source IPv4 address (network order, as in the frame) -> drop threshold:
// a frame is dropped when bpf_get_prandom_u32() < threshold, and always
// when the threshold is all ones.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOURCES);
	__type(key, __u32);
	__type(value, __u32);
} loss SEC(".maps");

// Source IPv4 address -> frames dropped since the program was loaded, per
// CPU so that counting needs no atomics. Kept when a source is healed.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_SOURCES);
	__type(key, __u32);
	__type(value, __u64);
} dropped SEC(".maps");

static __always_inline void count_drop(__u32 src)
{
	__u64 one = 1;
	__u64 *n = bpf_map_lookup_elem(&dropped, &src);

	if (n)
		*n += 1;
	else
		bpf_map_update_elem(&dropped, &src, &one, BPF_NOEXIST);
}

SEC("tcx/ingress")
int faultnet_ingress(struct __sk_buff *skb)
{
	// A frame whose headers are not all in the linear area would otherwise
	// pass unseen; pulling them in costs nothing on the common path.
	if ((long)skb->data + HEADERS_LEN > (long)skb->data_end)
		bpf_skb_pull_data(skb, skb->len < HEADERS_LEN ? skb->len : HEADERS_LEN);
	// Makes clang read data and data_end again from skb, rather than
	// through the context pointers it kept, which the verifier rejects.
	barrier_var(skb);

	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 src;

	if ((void *)(eth + 1) > end)
		return TCX_NEXT;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end)
			return TCX_NEXT;
		src = ip->saddr;
	} else if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		struct arp_ipv4 *arp = (void *)(eth + 1);

		if ((void *)(arp + 1) > end)
			return TCX_NEXT;
		if (arp->ptype != bpf_htons(ETH_P_IP) || arp->plen != 4)
			return TCX_NEXT;
		src = arp->spa;
	} else {
		return TCX_NEXT;
	}

	__u32 *threshold = bpf_map_lookup_elem(&loss, &src);
	if (!threshold || *threshold == 0)
		return TCX_NEXT;
	if (*threshold != ~0U && bpf_get_prandom_u32() >= *threshold)
		return TCX_NEXT;
	count_drop(src);
	return TCX_DROP;
}
