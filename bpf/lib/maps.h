/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every map of ferry's datapath, shared by all BPF objects.
 *
 * Maps are pinned by name under the agent's pin directory (default
 * /sys/fs/bpf/ferry), so the socket and tc objects share them and a restarted
 * agent adopts the live state instead of rebuilding it.
 *
 * The Rust loader (crates/ferry-bpf) gets these key/value types generated from
 * BTF by libbpf-cargo; the layout below is the single definition.
 *
 * Service state is split Cilium-style into frontends -> service -> backend
 * slots -> backends. A service's slots exist in two revisions; the agent
 * writes the inactive revision completely, then flips `svc_val.rev` with one
 * atomic update, so the datapath never sees a half-written service.
 */
#ifndef FERRY_MAPS_H
#define FERRY_MAPS_H

#include "common.h"

#define PIN_BY_NAME __uint(pinning, LIBBPF_PIN_BY_NAME)

/* ---- the layout version of the pinned datapath ---- */

/* Bump on every change of any map below, including a change of meaning at
 * the same size, and record in crates/ferry-bpf/src/layout.rs which maps
 * changed. A pinned datapath without ferry_meta is layout 0 (before
 * versioning). The agent compares before adopting (README: Upgrades). */
#define FERRY_LAYOUT 6

struct meta {
	__u32 layout; /* FERRY_LAYOUT of the agent that programmed these maps */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct meta);
	PIN_BY_NAME;
} ferry_meta SEC(".maps");

/* ---- frontends: (address, port, protocol) -> service port ---- */

/* Kinds of frontend (ferry_model::FrontendKind), plus a marker meaning
 * "this address is a ClusterIP": any other port on it is rejected. */
#define FE_CLUSTER_IP 0
#define FE_NODE_PORT 1
#define FE_LOAD_BALANCER 2
#define FE_EXTERNAL_IP 3
#define FE_CLUSTER_IP_ANY_PORT 4

/* fe_val.flags */
#define FE_FIREWALL 1 /* check ferry_firewall (loadBalancerSourceRanges) first */

struct fe_key {
	__u32 addr[4]; /* network order; IPv4 in addr[0]; all zero for NodePorts (any NodePort address) */
	__be16 port;   /* 0 with proto 0 for FE_CLUSTER_IP_ANY_PORT markers */
	__u8 proto;
	__u8 family; /* FAM_V4 / FAM_V6 */
};

struct fe_val {
	__u32 service;
	__u8 kind;
	__u8 flags;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, struct fe_key);
	__type(value, struct fe_val);
	PIN_BY_NAME;
} ferry_frontends SEC(".maps");

/* ---- services: one per service port and family ---- */

/* Route actions (ferry_model::Route): low bits say what, ACT_MASQ says SNAT. */
#define ACT_FORWARD_CLUSTER 1
#define ACT_FORWARD_LOCAL 2
#define ACT_DROP 3
#define ACT_REJECT 4
#define ACT_MASK 0x0f
#define ACT_MASQ 0x80

/* svc_val.flags */
#define SVC_AFFINITY 1
#define SVC_MAGLEV 2 /* the packet path picks backends from ferry_maglev */

#define SET_CLUSTER 0
#define SET_LOCAL 1

struct svc_val {
	__u16 count[2];     /* backends in the cluster / local set of revision `rev` */
	__u8 action[2][3];  /* [PATH_*][CLASS_*] */
	__u8 flags;
	__u8 rev;           /* live slot revision, 0 or 1 */
	__u32 affinity_timeout; /* seconds, with SVC_AFFINITY */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, __u32);
	__type(value, struct svc_val);
	PIN_BY_NAME;
} ferry_services SEC(".maps");

struct slot_key {
	__u32 service;
	__u8 rev;
	__u8 set; /* SET_CLUSTER / SET_LOCAL */
	__u16 slot;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1048576);
	__type(key, struct slot_key);
	__type(value, __u32); /* backend id */
	PIN_BY_NAME;
} ferry_slots SEC(".maps");

/* ---- backends: shared by every service that uses the same address:port ---- */

#define BE_LOCAL 1 /* on this node */

struct backend {
	__u32 addr[4];
	__be16 port;
	__u8 family;
	__u8 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 524288);
	__type(key, __u32);
	__type(value, struct backend);
	PIN_BY_NAME;
} ferry_backends SEC(".maps");

/* (service, backend) -> bitmask of sets (1 << SET_*) the backend is in now:
 * lets session affinity check in O(1) that a remembered backend is still valid. */
struct member_key {
	__u32 service;
	__u32 backend;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1048576);
	__type(key, struct member_key);
	__type(value, __u8);
	PIN_BY_NAME;
} ferry_members SEC(".maps");

/* ---- socket reverse translation (its own header: the socket iterator shares it) ---- */
#include "sockrev.h"

/* ---- session affinity (ClientIP) ---- */

/* The socket path keys clients by network-namespace cookie (one per pod, one
 * for the host): at connect() time the source address is not chosen yet.
 * The packet path keys them by source address. */
struct aff_key {
	__u64 netns;     /* socket path; 0 on the packet path */
	__u32 client[4]; /* packet path; zero on the socket path */
	__u32 service;
	__u32 pad;
};

struct aff_val {
	__u32 backend;
	__u32 pad;
	__u64 last_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct aff_key);
	__type(value, struct aff_val);
	PIN_BY_NAME;
} ferry_affinity SEC(".maps");

/* ---- loadBalancerSourceRanges: (service, source range) ---- */

struct fw_key {
	__u32 prefixlen; /* 32 (service) + range length */
	__u32 service;
	__u32 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct fw_key);
	__type(value, __u8);
	PIN_BY_NAME;
} ferry_firewall SEC(".maps");

/* ---- node addresses ---- */

#define LOCAL_HOST 1     /* an address of this node: a source here is the host */
#define LOCAL_NODEPORT 2 /* NodePorts are served on it */

struct local_key {
	__u32 addr[4];
	__u8 family;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct local_key);
	__type(value, __u8);
	PIN_BY_NAME;
} ferry_locals SEC(".maps");

/* ---- the pass-through fast path: which packets the tc programs must look at ----
 *
 * Most packets on a node's devices are not a service's: pod to pod across
 * nodes, the host's own traffic, and the connections socket-LB already sent
 * to a backend at connect(). They leave the tc programs after two hash
 * lookups (and the service-CIDR check) instead of four conntrack lookups and
 * the frontend lookups; see `passes_untouched` in netdev.bpf.c.
 *
 *   ferry_addrs  written by the agent: every frontend address (ClusterIP,
 *                LoadBalancer IP, ExternalIP), every node address (NodePorts,
 *                replies to SNATed and masqueraded flows) and every address
 *                the original direction of a tracked flow was sent to. An
 *                address stays until no frontend uses it and no tracked flow
 *                was sent to it (the agent's periodic collection), so the
 *                flows of a deleted Service keep being translated.
 *   ferry_peers  written by the datapath when it sends a new flow to a
 *                backend without SNAT: that backend's replies carry the
 *                backend's own address as source and must be translated back.
 *                The agent removes an address when it is no backend any more
 *                and no tracked flow uses it.
 *
 * Both are complete only once the agent has filled them (after an install or
 * an upgrade from a layout without them): until then CFG_FAST_PASS is off and
 * every packet takes the full path. Values carry no meaning (presence does). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, struct local_key);
	__type(value, __u8);
	PIN_BY_NAME;
} ferry_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 524288);
	__type(key, struct local_key);
	__type(value, __u8);
	PIN_BY_NAME;
} ferry_peers SEC(".maps");

/* ---- address ranges: pod ranges (local traffic detector), service CIDRs ---- */

#define RANGE_POD 1
#define RANGE_SERVICE 2
#define RANGE_MASQ_SOURCE 3 /* this node's pods: their egress may be masqueraded */
#define RANGE_NO_MASQ 4     /* destinations never masqueraded (and other nodes' addresses) */

struct range_key {
	__u32 prefixlen; /* 32 (kind, family, pad) + range length */
	__u8 kind;
	__u8 family;
	__u16 pad;
	__u32 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct range_key);
	__type(value, __u8);
	PIN_BY_NAME;
} ferry_ranges SEC(".maps");

/* ---- node-wide settings ---- */

/* config.flags */
#define CFG_PODS_BY_RANGE 1  /* a source inside a RANGE_POD range is a pod (ClusterCIDR / NodeCIDR) */
#define CFG_PODS_BY_DEVICE 2 /* a packet arriving on a DEV_POD device is from a pod (interface detectors) */
#define CFG_MASQ_BPF 4       /* masquerade pod egress (masquerade: bpf) */
#define CFG_FAST_PASS 8      /* ferry_addrs and ferry_peers are complete: a packet neither names passes at once */
#define CFG_DSR_TCP 16       /* loadBalancing.mode dsr or hybrid: outside TCP to a remote backend is tunnelled (dsr.h) */
#define CFG_DSR_DGRAM 32     /* loadBalancing.mode dsr: UDP and SCTP too */

struct config {
	__u64 host_netns;  /* netns cookie of the host: sockets there are CLASS_HOST */
	__u8 pod_class[2]; /* class of other sockets, per family (CLASS_POD when pods can be told apart) */
	__u8 flags;
	__u8 pad[5];
	__u32 primary[2][4]; /* primary node address per family (source-range checks, SNAT fallback) */
	/* Connection-tracking lifetimes, seconds. */
	__u32 tcp_syn_timeout;
	__u32 tcp_established_timeout;
	__u32 tcp_close_timeout;
	__u32 udp_timeout;
	/* Source ports for SNAT, inclusive; never overlapping the NodePort range. */
	__u16 nat_port_min;
	__u16 nat_port_max;
	__u32 maglev_size; /* slots of every Maglev table */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	PIN_BY_NAME;
} ferry_config SEC(".maps");

/* ---- node devices the tc programs are attached to ---- */

#define DEV_EXTERNAL 1 /* an uplink: traffic from outside the node arrives here */
#define DEV_POD 2      /* faces pods (a bridge, or pod veths) */

struct device {
	__u32 snat[2][4]; /* SNAT address per family for traffic leaving here (0: the primary address) */
	__u8 flags;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32); /* ifindex */
	__type(value, struct device);
	PIN_BY_NAME;
} ferry_devices SEC(".maps");

/* ---- connection tracking and NAT of the packet path ---- */

/* A flow is tracked by two entries, created and removed together: the
 * original direction as it arrives (client -> frontend) and the reply
 * direction as it arrives (backend -> client, or backend -> SNAT address). Each
 * says how to rewrite the packet, so either direction is one lookup. */
#define CT_ORIGINAL 0
#define CT_REPLY 1

struct ct_key {
	__u32 src[4];
	__u32 dst[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 dir;
	__u8 pad;
};

/* ct_val.flags */
#define CT_SNAT 1        /* the source was rewritten too */
#define CT_REPLIED 2     /* a reply was seen */
#define CT_CLOSING 4     /* FIN or RST seen */

struct ct_val {
	__u32 new_src[4];
	__u32 new_dst[4];
	__be16 new_sport;
	__be16 new_dport;
	__u32 backend;  /* backend id, to find the flows of a removed backend */
	__u32 service;
	__u8 flags;
	__u8 pad[3];
	__u64 expires_ns; /* bpf_ktime_get_ns() deadline; expired entries are misses */
};

/* Two tables, so that new flows never push out established ones (netfilter
 * keeps the same promise by early-dropping only unassured entries):
 *
 *   ferry_ct_new  unconfirmed flows: a TCP flow until its handshake completes
 *                 (the client's first segment after the reply without SYN or
 *                 RST), any other flow until its first reply. An LRU: a SYN
 *                 flood evicts other unconfirmed flows, nothing else.
 *   ferry_ct      confirmed flows, moved here from ferry_ct_new (both entries
 *                 together). A preallocated hash, not an LRU: nothing is ever
 *                 evicted; when it is full a confirmation fails (counted,
 *                 ct_confirm_full) and the flow stays served from ferry_ct_new.
 *                 Expired entries go when a packet meets them or at the
 *                 agent's periodic collection.
 *
 * Both hold the same entries; a lookup tries ferry_ct, then ferry_ct_new. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 524288);
	__type(key, struct ct_key);
	__type(value, struct ct_val);
	PIN_BY_NAME;
} ferry_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct ct_key);
	__type(value, struct ct_val);
	PIN_BY_NAME;
} ferry_ct_new SEC(".maps");

/* The conntrack table of layouts 0 and 1: one LRU of the same entries, no
 * flags. Two slots take such a table for the few milliseconds an upgrade or
 * a downgrade across the conntrack split switches the links, while programs
 * of two builds serve the node's hooks. Neither is pinned: each load's
 * programs hold their own, empty but for that window.
 *
 *   ferry_ct_prev  an upgrade: the retired table, set by the agent before the
 *                  first link switches and emptied after its copy of the flows
 *                  the outgoing programs created meanwhile (install.rs). A
 *                  miss in both tables looks here (ct_adopt_retired), so such
 *                  a flow is found, and moved over, at its first packet the
 *                  incoming programs see, not only at that copy.
 *   ferry_ct_next  a downgrade: the rebuilt older table, set by `ferry
 *                  datapath downgrade` once it is pinned, until the older
 *                  programs hold every link (downgrade.rs). Every flow these
 *                  programs create is written there too (ct_mirror_next), so
 *                  the older programs know it from their first packet. The
 *                  command puts it in ferry_ct_prev too: these programs then
 *                  find there the flows the older ones create meanwhile. */
struct ct_lru_table {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ct_key);
	__type(value, struct ct_val);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct ct_lru_table);
} ferry_ct_prev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct ct_lru_table);
} ferry_ct_next SEC(".maps");

/* dsr_val.flags */
#define DSR_CLOSING 1 /* FIN or RST seen */

/* The balancing node's flows carried by DSR: the original direction's
 * conntrack key (dir CT_ORIGINAL) -> where its packets are tunnelled. The
 * node never sees the replies, so no reply entry and no confirmation: an
 * LRU of its own, apart from ferry_ct. */
struct dsr_val {
	__u32 outer_src; /* this node's address the tunnel leaves from */
	__u32 via;       /* the backend's node */
	__u32 backend;   /* backend id, as ct_val.backend */
	__u32 service;
	__u8 flags;
	__u8 pad;
	__be16 backend_port; /* the backend, for the agent's stale-flow rule (ferry_bpf::stale) */
	__u32 backend_addr;  /* its IPv4 address; the low 16 bits go in the outer header (dsr.h) */
	__u64 expires_ns;
};

/* ferry_dsr6's value: dsr_val with IPv6 addresses (the IPv6 flows DSR
 * carries, IPv6 in IPv6; dsr.h). */
struct dsr6_val {
	__u32 outer_src[4];    /* this node's address the tunnel leaves from */
	__u32 via[4];          /* the backend's node */
	__u32 backend_addr[4]; /* the endpoint; its low 20 bits go in the outer flow label (dsr.h) */
	__u32 backend;         /* backend id, as ct_val.backend */
	__u32 service;
	__u8 flags;            /* DSR_* */
	__u8 pad;
	__be16 backend_port;
	__u32 pad2;
	__u64 expires_ns;
};

/* Room for ct_create's values and its NAT port walk, off the tc programs'
 * stack (at its 512-byte limit). Per CPU, not pinned: it lives for one packet. */
struct ct_scratch {
	struct ct_key rk;    /* the reply entry's key: its port is what the walk varies */
	struct ct_key victim; /* the original-direction key of a flow whose port is taken over */
	struct ct_val reply; /* the reply entry */
	struct ct_val orig;  /* the original-direction entry */
	__u64 now;
	__u32 lo, size;      /* natPortRange: first port, number of ports */
	__u32 start;         /* the walk's first offset into the range */
	__u8 icmp;           /* ICMP echo: the identifier is both "ports" */
	__u8 found;          /* the walk wrote the reply entry */
	__u16 pad;
	struct dsr_val dsr;  /* dsr_new_flow's entry for an IPv4 flow (its key in rk) */
	struct dsr6_val dsr6; /* ... for an IPv6 flow */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ct_scratch);
} ferry_ct_scratch SEC(".maps");

/* ---- Maglev lookup tables: (service, set) -> array of backend ids ---- */

/* Inner maps are created by the agent, one per table, and swapped in with
 * one update of the outer map; BPF_F_INNER_MAP lets their size follow the
 * configured table size. */
struct maglev_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_INNER_MAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 65536);
	__type(key, __u64); /* service << 8 | set */
	PIN_BY_NAME;
	__array(values, struct maglev_table);
} ferry_maglev SEC(".maps");

/* ---- service names, for `ferry status` only ---- */

struct svc_name {
	char name[120];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, __u32);
	__type(value, struct svc_name);
	PIN_BY_NAME;
} ferry_names SEC(".maps");

/* ---- fragments: a datagram's first fragment -> what its later fragments get ---- */

/* frag_val.verdict */
#define FRAG_PASS 0  /* untouched: later fragments pass too */
#define FRAG_XLATE 1 /* translated: later fragments get the same addresses */
#define FRAG_DROP 2  /* dropped (or answered with a reject): later fragments are dropped */
#define FRAG_LOOP 3  /* sent into the defrag loop (loop.h): the rest of the datagram follows it there */

struct frag_key {
	__u32 src[4]; /* as the fragment arrived at this hook */
	__u32 dst[4];
	__u32 id; /* IPv4 identification (low half) or IPv6 fragment identification */
	__u8 proto;
	__u8 family;
	__u16 pad;
};

struct frag_val {
	__u32 new_src[4];
	__u32 new_dst[4];
	__u8 verdict;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct frag_key);
	__type(value, struct frag_val);
	PIN_BY_NAME;
} ferry_frags SEC(".maps");

/* ---- Direct Server Return (loadBalancing.mode dsr / hybrid; dsr.h) ---- */

/* The tunnel table: a remote backend's address -> the IPv4 address of its
 * node, the outer destination of its tunnelled packets. The agent writes
 * every other node's pod ranges and its own addresses (/32), from the Node
 * objects (ferry_model::dsr::tunnels). IPv4 (IPv6: ferry_tunnels6). Also tells a tunnelled
 * packet's outer source apart as a node's (its own /32 entry names it). */
struct tunnel_key {
	__u32 prefixlen; /* 0..32 */
	__u32 addr;      /* network order */
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct tunnel_key);
	__type(value, __u32); /* the node's address, network order */
	PIN_BY_NAME;
} ferry_tunnels SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct ct_key);
	__type(value, struct dsr_val);
	PIN_BY_NAME;
} ferry_dsr SEC(".maps");

/* The same two for IPv6 (layout 6): maps of their own rather than a family
 * in the IPv4 ones' keys and values, so that those stay as layout 4 made
 * them (adopted both ways across the change). ferry_tunnels6: a remote
 * backend's IPv6 address -> its node's IPv6 address (the same rows as
 * ferry_tunnels, for the other family). */
struct tunnel6_key {
	__u32 prefixlen; /* 0..128 */
	__u32 addr[4];   /* network order */
};

struct tunnel6_val {
	__u32 addr[4]; /* the node's address, network order */
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct tunnel6_key);
	__type(value, struct tunnel6_val);
	PIN_BY_NAME;
} ferry_tunnels6 SEC(".maps");

/* The balancing node's IPv6 DSR flows: as ferry_dsr (the key's family is 6). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct ct_key);
	__type(value, struct dsr6_val);
	PIN_BY_NAME;
} ferry_dsr6 SEC(".maps");

#endif
