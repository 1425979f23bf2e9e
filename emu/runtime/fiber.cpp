// Fibers: each CUDA thread of a block runs on a stack of its own and gives the OS thread back
// only at a barrier, a warp collective or its exit. The switch saves the callee-saved registers
// and the floating-point control words, nothing more: a few nanoseconds.
//
// A fault inside kernel code (a guard page, a wild pointer) arrives as SIGSEGV or SIGBUS; the
// handler sends the faulting thread to a landing function on the worker's fault stack, which
// fails the launch like any other check. Faults outside kernel threads go to the handler that
// was installed before.

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "internal.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace moe_emu {

Stack* stack_new(size_t size) {
    const size_t len = size + kPage;
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK,
                   -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mprotect(p, kPage, PROT_NONE);  // overflow guard below the stack
    return new Stack{static_cast<uint8_t*>(p) + kPage, size};
}

extern "C" void moe_emu_fiber_main(Fiber* f);

#if defined(__x86_64__)

// void moe_emu_switch(void** save_sp, void* load_sp): System V, callee-saved rbx, rbp, r12-r15,
// MXCSR and the x87 control word.
asm(R"(
    .text
    .p2align 4
    .globl moe_emu_switch
    .hidden moe_emu_switch
    .type moe_emu_switch, @function
moe_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size moe_emu_switch, .-moe_emu_switch

    .p2align 4
    .globl moe_emu_fiber_start
    .hidden moe_emu_fiber_start
    .type moe_emu_fiber_start, @function
moe_emu_fiber_start:
    movq %rbx, %rdi
    call moe_emu_fiber_main
    ud2
    .size moe_emu_fiber_start, .-moe_emu_fiber_start
)");

extern "C" void moe_emu_switch(void** save_sp, void* load_sp);
extern "C" void moe_emu_fiber_start();

void fiber_switch(void** save_sp, void* load_sp) { moe_emu_switch(save_sp, load_sp); }

void fiber_prepare(Fiber& f, Stack* s) {
    f.stack = s;
    // The return address of the first switch sits at an address = 8 (mod 16), so that
    // moe_emu_fiber_start begins with rsp = 0 (mod 16) and its call is aligned.
    uintptr_t top = reinterpret_cast<uintptr_t>(s->base + s->size) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 24);
    sp[0] = reinterpret_cast<uint64_t>(&moe_emu_fiber_start);  // ret
    sp[1] = 0;
    *--sp = 0;                                  // rbp
    *--sp = reinterpret_cast<uint64_t>(&f);     // rbx: the fiber
    *--sp = 0;                                  // r12
    *--sp = 0;                                  // r13
    *--sp = 0;                                  // r14
    *--sp = 0;                                  // r15
    --sp;                                       // mxcsr, x87 control word
    uint32_t csr;
    uint16_t cw;
    asm volatile("stmxcsr %0" : "=m"(csr));
    asm volatile("fnstcw %0" : "=m"(cw));
    reinterpret_cast<uint32_t*>(sp)[0] = csr;
    reinterpret_cast<uint16_t*>(sp)[2] = cw;
    f.sp = sp;
}

#else  // portable fallback: ucontext (slower: each switch makes a system call)

namespace {
struct Ctx {
    ucontext_t uc;
};
void start_trampoline(unsigned lo, unsigned hi) {
    moe_emu_fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | lo));
}
}  // namespace

void fiber_switch(void** save_sp, void* load_sp) {
    Ctx* from = static_cast<Ctx*>(*save_sp);
    if (from == nullptr) {
        from = new Ctx;
        *save_sp = from;
    }
    swapcontext(&from->uc, &static_cast<Ctx*>(load_sp)->uc);
}

void fiber_prepare(Fiber& f, Stack* s) {
    f.stack = s;
    Ctx* c = static_cast<Ctx*>(f.sp);
    if (c == nullptr) c = new Ctx;
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = s->base;
    c->uc.uc_stack.ss_size = s->size;
    c->uc.uc_link = nullptr;
    const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
    makecontext(&c->uc, reinterpret_cast<void (*)()>(&start_trampoline), 2, unsigned(p), unsigned(p >> 32));
    f.sp = c;
}

#endif

// ---- faults ------------------------------------------------------------------------------------

namespace {

struct sigaction previous[32];
bool installed = false;
std::mutex install_mu;

extern "C" [[noreturn]] void moe_emu_fault_landing() {
    Worker* w = tls_worker;
    fail(w->fault_status, w->fault_msg);
}

void on_fault(int sig, siginfo_t* info, void* uctx) {
    Worker* w = tls_worker;
    if (w != nullptr && w->current != nullptr) {
        const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
        const Fiber& f = *w->current;
        const uintptr_t lo = reinterpret_cast<uintptr_t>(f.stack ? f.stack->base : nullptr);
        if (sig == SIGFPE) {
            w->fault_status = kLaunchFailed;
            w->fault_msg = "arithmetic fault (SIGFPE)";
        } else if (f.stack != nullptr && addr < lo && addr + kPage >= lo) {
            w->fault_status = kLaunchFailed;
            w->fault_msg = strf("stack overflow of the emulated thread (%zu KiB stacks; MOE_EMU_STACK_KB sets "
                                "the size)", f.stack->size / 1024);
        } else if (addr - reinterpret_cast<uintptr_t>(w->sh_lo) < kSharedWindow + kPage ||
                   reinterpret_cast<uintptr_t>(w->sh_lo) - addr <= kPage) {
            w->fault_status = kIllegalAddress;
            w->fault_msg = strf("shared-memory access at 0x%lx outside the block's window", (unsigned long)addr);
        } else {
            w->fault_status = kIllegalAddress;
            w->fault_msg = strf("invalid memory access: %s", describe_address(addr, 1).c_str());
        }
        // Resume at the landing function, on the worker's fault stack.
        uintptr_t top = (reinterpret_cast<uintptr_t>(w->fault_stack + w->fault_stack_size) & ~uintptr_t(15)) - 8;
        ucontext_t* uc = static_cast<ucontext_t*>(uctx);
#if defined(__x86_64__)
        uc->uc_mcontext.gregs[REG_RIP] = reinterpret_cast<greg_t>(&moe_emu_fault_landing);
        uc->uc_mcontext.gregs[REG_RSP] = greg_t(top);
#elif defined(__aarch64__)
        uc->uc_mcontext.pc = reinterpret_cast<uintptr_t>(&moe_emu_fault_landing);
        uc->uc_mcontext.sp = top & ~uintptr_t(15);
#else
#error "the emulator's fault handler knows x86-64 and aarch64"
#endif
        return;
    }
    // Not ours: hand it to whoever was there before (Rust's stack-overflow report, the default).
    struct sigaction& prev = previous[sig];
    if (prev.sa_flags & SA_SIGINFO) {
        prev.sa_sigaction(sig, info, uctx);
    } else if (prev.sa_handler == SIG_IGN) {
        return;
    } else if (prev.sa_handler != SIG_DFL) {
        prev.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);
        raise(sig);
    }
}

}  // namespace

void install_fault_handlers() {
    std::lock_guard<std::mutex> g(install_mu);
    if (installed) return;
    struct sigaction sa {};
    sa.sa_sigaction = &on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    for (int sig : {SIGSEGV, SIGBUS, SIGFPE}) sigaction(sig, &sa, &previous[sig]);
    installed = true;
}

void worker_enter_kernel(Worker* w) {
    // The handler runs on an alternate stack: a fiber's own stack may be the one that overflowed.
    static thread_local bool has_altstack = false;
    if (!has_altstack) {
        const size_t n = 64 * 1024;
        stack_t ss{};
        ss.ss_sp = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        ss.ss_size = n;
        sigaltstack(&ss, nullptr);
        has_altstack = true;
    }
    if (w->fault_stack == nullptr) {
        w->fault_stack_size = 256 * 1024;
        w->fault_stack = static_cast<uint8_t*>(
            mmap(nullptr, w->fault_stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    }
}

}  // namespace moe_emu
