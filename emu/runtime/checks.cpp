// The checks the compiler puts into every emulated kernel, and what they do when they fire.
//
// Kernels are compiled with gcc's -fsanitize=kernel-address in its outline form: every load and
// store of kernel code calls __asan_{load,store}N_noabort(addr) first. Here those calls check
// the address against the device allocations (exactly, to the byte) and the block's shared
// memory; stack and other host addresses pass. They are also compiled with UBSan
// (alignment, bounds, shift, signed-integer-overflow, integer-divide-by-zero, null, return,
// unreachable, vla-bound, bool, enum, pointer-overflow); its handlers are ours too. Each finding
// fails the launch with where it happened, instead of printing and going on.

#include "internal.h"

namespace moe_emu {

namespace {

bool in_range(uintptr_t a, size_t n, const uint8_t* lo, size_t len) {
    const uintptr_t off = a - reinterpret_cast<uintptr_t>(lo);
    return off < len && n <= len - off;
}

}  // namespace

bool shared_ok(const Worker& w, uintptr_t a, size_t n) {
    return in_range(a, n, w.sh_lo, w.static_used) || in_range(a, n, w.dyn_base, w.dyn_bytes);
}

std::string describe_shared(const Worker& w, uintptr_t a, size_t n) {
    return strf("the %zu bytes at shared offset 0x%lx lie outside the block's shared memory (static variables "
                "at [0, 0x%zx), the dynamic part at [0x%lx, 0x%lx))",
                n, (unsigned long)(a - reinterpret_cast<uintptr_t>(w.sh_lo)), w.static_used,
                (unsigned long)(w.dyn_base - w.sh_lo), (unsigned long)(w.dyn_base - w.sh_lo + w.dyn_bytes));
}

// `site` is the kernel code's call site, for the counters (0: not counted here).
__attribute__((always_inline)) inline void check(uintptr_t a, size_t n, bool write, uint64_t site) {
    if (a - heap.lo < heap.span) {
        const uint32_t id = heap.slots[(a - heap.lo) >> kSlotShift];
        if (id != 0) {
            const Alloc& al = heap.allocs[id - 1];
            const uintptr_t off = a - al.base;
            if (al.live && off < al.size && n <= al.size - off) {
                if (__builtin_expect(g_counting, 0) && site != 0)
                    count_access(site, a, uint32_t(n), write ? kGStore : kGLoad);
                return;
            }
        }
        fail(kIllegalAddress, strf("out-of-bounds %s of %zu bytes at 0x%lx: %s", write ? "write" : "read", n,
                                   (unsigned long)a, describe_address(a, n).c_str()));
    }
    Worker* w = tls_worker;
    if (w == nullptr) return;
    const uintptr_t lo = reinterpret_cast<uintptr_t>(w->sh_lo);
    if (a - lo < kSharedWindow + kPage || lo - a <= kPage) {
        if (shared_ok(*w, a, n)) {
            if (write) mark_generic(*w, a - lo, n);
            if (__builtin_expect(g_counting, 0) && site != 0) count_access(site, a, uint32_t(n), write ? kSStore : kSLoad);
            return;
        }
        fail(kIllegalAddress, strf("out-of-bounds shared-memory %s: %s", write ? "write" : "read",
                                   describe_shared(*w, a, n).c_str()));
    }
}

void check_access(const volatile void* p, size_t n, bool write, const void* site) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a % n != 0) fail(kMisaligned, strf("misaligned %zu-byte atomic at 0x%lx", n, (unsigned long)a));
    check(a, n, write, 0);
    const bool global = a - heap.lo < heap.span;
    if (!global) {
        const Worker* w = tls_worker;
        if (w == nullptr || !shared_ok(*w, a, n))
            fail(kIllegalAddress, strf("atomic on 0x%lx, which is neither device nor shared memory", (unsigned long)a));
    }
    if (__builtin_expect(g_counting, 0))
        count_access(uint64_t(site), a, uint32_t(n), global ? kGAtomic : kSAtomic);
}

// ---- UBSan's handler ABI (gcc's libsanitizer, ubsan_handlers.h) --------------------------------

namespace {

struct SourceLocation {
    const char* file;
    uint32_t line;
    uint32_t column;
};
struct TypeDescriptor {
    uint16_t kind;  // 0 integer, 1 float
    uint16_t info;  // integer: bit 0 signed, bits 1.. log2 of the width
    char name[1];
};

std::string loc(const SourceLocation& l) {
    const char* f = l.file ? l.file : "?";
    // Paths from the kernels' line markers: keep the part from emu/ or kernels/.
    for (const char* key : {"/emu/", "/kernels/"}) {
        if (const char* k = strstr(f, key)) {
            f = k + 1;
            break;
        }
    }
    return strf("%s:%u:%u", f, l.line, l.column);
}

std::string value(const TypeDescriptor* t, uintptr_t v) {
    if (t == nullptr || t->kind != 0) return strf("0x%lx", (unsigned long)v);
    const unsigned bits = 1u << (t->info >> 1);
    if (bits > 64) return "(wide)";
    if (t->info & 1) {
        const int64_t s = bits == 64 ? int64_t(v) : int64_t(v << (64 - bits)) >> (64 - bits);
        return strf("%lld", (long long)s);
    }
    const uint64_t u = bits == 64 ? uint64_t(v) : uint64_t(v) & ((uint64_t(1) << bits) - 1);
    return strf("%llu", (unsigned long long)u);
}

const char* tname(const TypeDescriptor* t) { return t ? t->name : "?"; }

[[noreturn]] void ub(Status s, const SourceLocation& l, const std::string& what) {
    fail(s, strf("undefined behaviour at %s: %s", loc(l).c_str(), what.c_str()));
}

struct TypeMismatchData {
    SourceLocation loc;
    const TypeDescriptor* type;
    unsigned char log_alignment;
    unsigned char type_check_kind;
};
struct OverflowData {
    SourceLocation loc;
    const TypeDescriptor* type;
};
struct ShiftData {
    SourceLocation loc;
    const TypeDescriptor* lhs;
    const TypeDescriptor* rhs;
};
struct OutOfBoundsData {
    SourceLocation loc;
    const TypeDescriptor* array;
    const TypeDescriptor* index;
};
struct LocData {
    SourceLocation loc;
};
struct TypedData {
    SourceLocation loc;
    const TypeDescriptor* type;
};

const char* kAccess[] = {"load of",   "store to",  "reference binding to", "member access within",
                         "member call on", "constructor call on", "downcast of", "downcast of",
                         "upcast of", "cast to virtual base of", "_Nonnull binding to", "dynamic operation on"};

void type_mismatch(TypeMismatchData* d, uintptr_t p) {
    const char* what = d->type_check_kind < sizeof kAccess / sizeof *kAccess ? kAccess[d->type_check_kind] : "use of";
    if (p == 0) ub(kIllegalAddress, d->loc, strf("%s a null pointer of type %s", what, tname(d->type)));
    const uintptr_t align = uintptr_t(1) << d->log_alignment;
    if (p & (align - 1))
        ub(kMisaligned, d->loc,
           strf("%s misaligned address 0x%lx for type %s, which needs %lu-byte alignment", what, (unsigned long)p,
                tname(d->type), (unsigned long)align));
    ub(kLaunchFailed, d->loc, strf("%s 0x%lx, too small for type %s", what, (unsigned long)p, tname(d->type)));
}

void overflow(OverflowData* d, uintptr_t a, uintptr_t b, const char* op) {
    ub(kLaunchFailed, d->loc,
       strf("signed integer overflow: %s %s %s in type %s", value(d->type, a).c_str(), op, value(d->type, b).c_str(),
            tname(d->type)));
}

}  // namespace

}  // namespace moe_emu

using namespace moe_emu;

extern "C" {

// The return address of each check is the kernel's access site (the counters' request key).
#define MOE_EMU_SITE uint64_t(__builtin_return_address(0))
#define MOE_EMU_ASAN(N)                                                                           \
    void __asan_load##N##_noabort(uintptr_t a) { check(a, N, false, MOE_EMU_SITE); }           \
    void __asan_store##N##_noabort(uintptr_t a) { check(a, N, true, MOE_EMU_SITE); }           \
    void __asan_load##N(uintptr_t a) { check(a, N, false, MOE_EMU_SITE); }                      \
    void __asan_store##N(uintptr_t a) { check(a, N, true, MOE_EMU_SITE); }
MOE_EMU_ASAN(1)
MOE_EMU_ASAN(2)
MOE_EMU_ASAN(4)
MOE_EMU_ASAN(8)
MOE_EMU_ASAN(16)
#undef MOE_EMU_ASAN
void __asan_loadN_noabort(uintptr_t a, size_t n) { check(a, n, false, MOE_EMU_SITE); }
void __asan_storeN_noabort(uintptr_t a, size_t n) { check(a, n, true, MOE_EMU_SITE); }
void __asan_loadN(uintptr_t a, size_t n) { check(a, n, false, MOE_EMU_SITE); }
void __asan_storeN(uintptr_t a, size_t n) { check(a, n, true, MOE_EMU_SITE); }
#undef MOE_EMU_SITE
void __asan_handle_no_return() {}

// Each UBSan check has a recoverable and an _abort form; both fail the launch.
#define MOE_EMU_UBSAN(NAME, PARAMS, BODY) \
    void __ubsan_handle_##NAME PARAMS BODY  \
    void __ubsan_handle_##NAME##_abort PARAMS BODY

MOE_EMU_UBSAN(type_mismatch_v1, (TypeMismatchData * d, uintptr_t p), { type_mismatch(d, p); })
MOE_EMU_UBSAN(add_overflow, (OverflowData * d, uintptr_t a, uintptr_t b), { overflow(d, a, b, "+"); })
MOE_EMU_UBSAN(sub_overflow, (OverflowData * d, uintptr_t a, uintptr_t b), { overflow(d, a, b, "-"); })
MOE_EMU_UBSAN(mul_overflow, (OverflowData * d, uintptr_t a, uintptr_t b), { overflow(d, a, b, "*"); })
MOE_EMU_UBSAN(negate_overflow, (OverflowData * d, uintptr_t a), {
    ub(kLaunchFailed, d->loc, strf("signed integer overflow: -(%s) in type %s", value(d->type, a).c_str(), tname(d->type)));
})
MOE_EMU_UBSAN(divrem_overflow, (OverflowData * d, uintptr_t a, uintptr_t b), {
    ub(kLaunchFailed, d->loc,
       strf("division %s / %s in type %s", value(d->type, a).c_str(), value(d->type, b).c_str(), tname(d->type)));
})
MOE_EMU_UBSAN(shift_out_of_bounds, (ShiftData * d, uintptr_t a, uintptr_t b), {
    ub(kLaunchFailed, d->loc,
       strf("a shift of %s by %s bits, out of range for type %s", value(d->lhs, a).c_str(),
            value(d->rhs, b).c_str(), tname(d->lhs)));
})
MOE_EMU_UBSAN(out_of_bounds, (OutOfBoundsData * d, uintptr_t i), {
    ub(kIllegalAddress, d->loc, strf("index %s out of bounds for type %s", value(d->index, i).c_str(), tname(d->array)));
})
MOE_EMU_UBSAN(load_invalid_value, (TypedData * d, uintptr_t v), {
    ub(kLaunchFailed, d->loc, strf("load of value %s, not valid for type %s", value(d->type, v).c_str(), tname(d->type)));
})
MOE_EMU_UBSAN(vla_bound_not_positive, (TypedData * d, uintptr_t v), {
    ub(kLaunchFailed, d->loc, strf("variable-length array bound %s is not positive", value(d->type, v).c_str()));
})
MOE_EMU_UBSAN(pointer_overflow, (LocData * d, uintptr_t base, uintptr_t result), {
    ub(kLaunchFailed, d->loc,
       strf("pointer arithmetic 0x%lx -> 0x%lx overflows", (unsigned long)base, (unsigned long)result));
})
MOE_EMU_UBSAN(nonnull_arg, (LocData * d), { ub(kLaunchFailed, d->loc, "null passed as a non-null argument"); })
MOE_EMU_UBSAN(nonnull_return_v1, (LocData * d, LocData*), { ub(kLaunchFailed, d->loc, "null returned from a non-null function"); })
MOE_EMU_UBSAN(invalid_builtin, (LocData * d), { ub(kLaunchFailed, d->loc, "invalid argument to a builtin (ctz/clz of 0)"); })
#undef MOE_EMU_UBSAN

[[noreturn]] void __ubsan_handle_builtin_unreachable(LocData* d) { ub(kLaunchFailed, d->loc, "__builtin_unreachable reached"); }
[[noreturn]] void __ubsan_handle_missing_return(LocData* d) {
    ub(kLaunchFailed, d->loc, "the end of a value-returning function reached");
}

}  // extern "C"
