//! `demo`: a tiny protected-mode kernel with paging and two preempted user
//! tasks. See docs/guests.md for the memory map and the expected output.
//!
//! Kernel: own GDT (kernel/user code and data, TSS) and IDT, a page
//! directory per task sharing the kernel's identity table for [0, 4 MiB)
//! (supervisor only), PIC + PIT at 100 Hz, round-robin preemption on IRQ0
//! switching CR3 and TSS.ESP0, `int BYTE 0x80` (eax=1 print string ebx, eax=2
//! print number ebx), demand paging of the heap [0x500000, 0x600000), and
//! tasks killed on #DE, on a bad #PF, or on any other exception.
//!
//! Tasks (CPL 3, code at 0x400000, stack below 0x800000, the tick count
//! readable at 0x600000):
//! - A writes 3 heap pages, waits 6 ticks, then reads kernel memory at
//!   0x00100000 (a supervisor page): killed by page fault;
//! - B writes 2 heap pages, waits 2 ticks, then divides by zero: killed by
//!   divide error.
//!
//! When no task is left the kernel prints a report and writes 0 to
//! isa-debug-exit.

use dynasmrt::{DynasmApi, DynasmLabelApi};

use super::kernel::*;

/// Ticks per second of the demo's timer.
pub const TIMER_HZ: u32 = 100;

// Kernel variables (dwords at VARS + 4 n).
const fn var(n: u32) -> i32 {
    (VARS + 4 * n) as i32
}
const CUR: i32 = var(0);
const TICKS: i32 = var(1);
const SYSCALLS: i32 = var(2);
const PFAULTS: i32 = var(3);
const DEMAND: i32 = var(4);
const SWITCHES: i32 = var(5);
const NEXT_FRAME: i32 = var(6);
// Per-task arrays of two dwords.
const ALIVE: i32 = var(7);
const KSP: i32 = var(9);
const CR3S: i32 = var(11);
const PTS: i32 = var(13);
const KTOP: i32 = var(15);
const REASON: i32 = var(17);
const FADDR: i32 = var(19);
const HEAP: i32 = var(21);
/// Reason strings, indexed by reason - 1.
const REASON_TABLE: u32 = VARS + 0x200;
const REASON_TABLE_M4: i32 = REASON_TABLE as i32 - 4;

/// Why a task died.
const KILLED_DE: i32 = 1;
const KILLED_PF: i32 = 2;
const KILLED_OTHER: i32 = 3;

// Offsets in the interrupt frame after `pushad` (stub pushed error code
// and vector).
const F_EBX: i32 = 16;
const F_EAX: i32 = 28;
const F_VECTOR: i32 = 32;
const F_ERR: i32 = 36;
const F_EIP: i32 = 40;
const F_CS: i32 = 44;

const TASKS: [(u32, u32, u32, u32, u32); 2] = [
    // (page directory, user page table, user stack frame, kernel stack top, unused)
    (PD0, PT_USER0, USTACK0, KSTACK0_TOP, 0),
    (PD1, PT_USER1, USTACK1, KSTACK1_TOP, 0),
];

/// The demo image: (bytes at LOAD_ADDR, entry).
pub fn build() -> (Vec<u8>, u32) {
    let mut img = Image::new();
    img.tables();
    let mut ks = Strings::new(KSTRINGS, KSTRINGS_END);
    let (entries, ucode, ustrings) = user_code();
    img.put(UCODE, &ucode);
    ustrings.place(&mut img, USER_VA - UCODE);

    let mut k = Asm::new(KCODE);
    let (entry, r) = kernel_start(&mut k);

    print(&mut k, &r, ks.add("popek demo: protected mode, paging, 2 user tasks preempted by the PIT at 100 Hz\n"));
    identity_table(&mut k);
    for (t, &(pd, pt, ustack, ktop, _)) in TASKS.iter().enumerate() {
        setup_task(&mut k, t as i32, pd, pt, ustack, ktop, entries[t]);
    }
    let pool = FRAME_POOL as i32;
    x86!(k; mov DWORD [NEXT_FRAME], pool);
    init_pic(&mut k, true);
    init_pit(&mut k, TIMER_HZ);
    let pd0 = PD0 as i32;
    x86!(k; mov eax, pd0);
    enable_paging(&mut k);
    let uds = i32::from(USER_DS);
    x86!(k; mov eax, uds);
    k.load_data_segs_ax();
    let switch_to = k.label();
    x86!(k; xor ecx, ecx ; jmp =>switch_to);

    // ---- interrupt entry ------------------------------------------------
    let common = k.label();
    interrupt_stubs(&mut k, &mut img, (0u8..32).chain([VEC_TIMER, VEC_TIMER + 7, VEC_SYSCALL]), common, VEC_SYSCALL);

    let (ret_user, timer, syscall, pagefault, divide, other, schedule, kill, panic) =
        (k.label(), k.label(), k.label(), k.label(), k.label(), k.label(), k.label(), k.label(), k.label());
    let spurious = k.label();
    let (vt, vs, vpf, vde, vsp) =
        (i32::from(VEC_TIMER), i32::from(VEC_SYSCALL), i32::from(VEC_PF), i32::from(VEC_DE), i32::from(VEC_TIMER + 7));
    x86!(k;
        =>common
        ; pushad
        ; cld
        ; mov eax, [esp + F_VECTOR]
        ; cmp eax, vt
        ; je =>timer
        ; cmp eax, vs
        ; je =>syscall
        ; cmp eax, vsp
        ; je =>spurious
        ; test DWORD [esp + F_CS], 3
        ; jz =>panic
        ; cmp eax, vpf
        ; je =>pagefault
        ; cmp eax, vde
        ; je =>divide
        ; jmp =>other

        ; =>ret_user
        ; popad
        ; add esp, 8
    );
    k.iretd();

    // Spurious IRQ7: no EOI.
    x86!(k; =>spurious ; jmp =>ret_user);

    // ---- timer: tick, EOI, switch ------------------------------------------
    let shared = SHARED as i32;
    x86!(k;
        =>timer
        ; inc DWORD [TICKS]
        ; mov eax, [TICKS]
        ; mov [shared], eax
    );
    k.outb(0x20, 0x20);
    let stay = k.label();
    x86!(k;
        =>schedule
        ; mov ebx, [CUR]
        ; mov [ebx * 4 + KSP], esp
        ; mov ecx, ebx
        ; xor ecx, 1
        ; cmp DWORD [ecx * 4 + ALIVE], 0
        ; je =>stay
        ; inc DWORD [SWITCHES]
        ; jmp =>switch_to
        ; =>stay
        ; mov ecx, ebx

        // ecx = task to run: its stack, address space and ESP0.
        ; =>switch_to
        ; mov [CUR], ecx
        ; mov esp, [ecx * 4 + KSP]
        ; mov eax, [ecx * 4 + CR3S]
    );
    k.mov_cr_eax(3);
    let esp0 = (TSS + 4) as i32;
    x86!(k;
        mov eax, [ecx * 4 + KTOP]
        ; mov [esp0], eax
        ; jmp =>ret_user
    );

    // ---- int BYTE 0x80 -----------------------------------------------------------
    let (sys2, bad) = (k.label(), k.label());
    let (puts, dec) = (r.puts, r.print_dec);
    x86!(k;
        =>syscall
        ; inc DWORD [SYSCALLS]
        ; mov eax, [esp + F_EAX]
        ; cmp eax, 1
        ; jne =>sys2
        ; mov esi, [esp + F_EBX]
        ; call =>puts
        ; jmp =>ret_user
        ; =>sys2
        ; cmp eax, 2
        ; jne =>bad
        ; mov eax, [esp + F_EBX]
        ; call =>dec
        ; jmp =>ret_user
        ; =>bad
        ; mov DWORD [esp + F_EAX], -1
        ; jmp =>ret_user
    );

    // ---- page fault: demand-page the heap, else kill --------------------------
    let (pf_kill, pf_in) = (k.label(), k.label());
    let (heap_lo, heap_hi, pool_end) = (HEAP_VA as i32, HEAP_END_VA as i32, FRAME_POOL_END as i32);
    let urw = (P | RW | US) as i32;
    x86!(k;
        =>pagefault
        ; inc DWORD [PFAULTS]
    );
    k.mov_eax_cr(2);
    x86!(k;
        mov edx, eax
        ; test DWORD [esp + F_ERR], 1
        ; jnz =>pf_kill
        ; cmp edx, heap_lo
        ; jb =>pf_kill
        ; cmp edx, heap_hi
        ; jae =>pf_kill
        ; mov edi, [NEXT_FRAME]
        ; cmp edi, pool_end
        ; jae =>pf_kill
        ; =>pf_in
        ; add DWORD [NEXT_FRAME], 0x1000
        ; push edi
        ; mov ecx, 1024
        ; xor eax, eax
        ; rep stosd
        ; pop edi
        ; mov ecx, [CUR]
        ; mov ebx, [ecx * 4 + PTS]
        ; mov eax, edx
        ; shr eax, 12
        ; and eax, 0x3FF
        ; or edi, urw
        ; mov [ebx + eax * 4], edi
        ; inc DWORD [DEMAND]
        ; inc DWORD [ecx * 4 + HEAP]
        ; jmp =>ret_user

        ; =>pf_kill
        ; mov eax, KILLED_PF
        ; jmp =>kill

        ; =>divide
        ; mov eax, KILLED_DE
        ; mov edx, [esp + F_EIP]
        ; jmp =>kill

        ; =>other
        ; mov eax, KILLED_OTHER
        ; mov edx, [esp + F_VECTOR]
        ; jmp =>kill
    );

    // ---- kill the current task (eax = reason, edx = address) -------------------
    let all_dead = k.label();
    let msg_task = ks.add("kernel: task ") as i32;
    let reason_msgs = [
        ks.add(" killed by divide error at eip "),
        ks.add(" killed by page fault at "),
        ks.add(" killed by exception "),
    ];
    let nl = ks.add("\n");
    let nl_i = nl as i32;
    let putc = r.putc;
    x86!(k;
        =>kill
        ; mov ecx, [CUR]
        ; mov DWORD [ecx * 4 + ALIVE], 0
        ; mov [ecx * 4 + REASON], eax
        ; mov [ecx * 4 + FADDR], edx
        ; mov esi, msg_task
        ; call =>puts
        ; push eax
        ; mov al, 0x41
        ; add al, cl
        ; call =>putc
        ; pop eax
        ; mov esi, [eax * 4 + REASON_TABLE_M4]
        ; call =>puts
        ; mov eax, edx
    );
    for (i, &m) in reason_msgs.iter().enumerate() {
        img.put_u32(REASON_TABLE + 4 * i as u32, m);
    }
    let hex = r.print_hex;
    x86!(k;
        call =>hex
        ; mov esi, nl_i
        ; call =>puts
        ; xor ecx, 1
        ; cmp DWORD [ecx * 4 + ALIVE], 0
        ; je =>all_dead
        ; inc DWORD [SWITCHES]
        ; jmp =>switch_to
    );

    // ---- report and exit ------------------------------------------------------
    k.bind(all_dead);
    print(&mut k, &r, ks.add("demo: report\n"));
    let reasons = [
        ks.add(": killed by divide error at eip "),
        ks.add(": killed by page fault at "),
        ks.add(": killed by exception "),
    ];
    for t in 0..2i32 {
        let name = ks.add(&format!("  task {}", (b'A' + t as u8) as char));
        print(&mut k, &r, name);
        let done = k.label();
        for (i, &m) in reasons.iter().enumerate() {
            let next = k.label();
            let code = i as i32 + 1;
            let (reason_t, faddr_t, mi) = (REASON + 4 * t, FADDR + 4 * t, m as i32);
            x86!(k;
                cmp DWORD [reason_t], code
                ; jne =>next
                ; mov esi, mi
                ; call =>puts
                ; mov eax, [faddr_t]
                ; call =>hex
                ; jmp =>done
                ; =>next
            );
        }
        k.bind(done);
        print(&mut k, &r, ks.add(", heap pages "));
        let heap_t = HEAP + 4 * t;
        x86!(k; mov eax, [heap_t] ; call =>dec);
        print(&mut k, &r, nl);
    }
    let counters = [
        (ks.add("  page faults "), PFAULTS),
        (ks.add(" (demand-paged "), DEMAND),
        (ks.add("), timer ticks "), TICKS),
        (ks.add(", syscalls "), SYSCALLS),
        (ks.add(", task switches "), SWITCHES),
    ];
    for (s, v) in counters {
        print(&mut k, &r, s);
        x86!(k; mov eax, [v] ; call =>dec);
    }
    print(&mut k, &r, ks.add("\ndemo: done\n"));
    let exit = r.exit;
    x86!(k; mov al, 0 ; jmp =>exit);

    // ---- kernel-mode exception: panic ------------------------------------------
    k.bind(panic);
    print(&mut k, &r, ks.add("kernel panic: exception "));
    x86!(k; mov eax, [esp + F_VECTOR] ; call =>dec);
    print(&mut k, &r, ks.add(" at eip "));
    x86!(k; mov eax, [esp + F_EIP] ; call =>hex);
    print(&mut k, &r, ks.add(" error code "));
    x86!(k; mov eax, [esp + F_ERR] ; call =>hex);
    print(&mut k, &r, nl);
    x86!(k; mov al, 1 ; jmp =>exit);
    let _ = (setup_task_frame_dwords(), pf_in);

    let code = k.finish();
    assert!(code.len() <= KCODE_MAX as usize, "demo kernel code is {} bytes", code.len());
    img.put(KCODE, &code);
    ks.place(&mut img, 0);
    (img.bytes, entry)
}

/// Dwords of a task's initial kernel-stack frame: pushad (8), vector and
/// error code (2), the iret frame to CPL 3 (5).
const fn setup_task_frame_dwords() -> u32 {
    15
}

/// Page directory, user page table and initial kernel stack of task `t`.
fn setup_task(k: &mut Asm, t: i32, pd: u32, pt: u32, ustack: u32, ktop: u32, entry: u32) {
    let pde = |a: u32, f: u32| (a | f) as i32;
    let pdi = pd as i32;
    let pti = pt as i32;
    let (kpt, upt) = (pde(PT_KERNEL, P | RW), pde(pt, P | RW | US));
    let code = pde(UCODE, P | US);
    let shared = pde(SHARED, P | US);
    let stack = pde(ustack, P | RW | US);
    let ucode_i = (((USER_VA >> 12) & 0x3FF) * 4) as i32;
    let shared_i = (((SHARED_VA >> 12) & 0x3FF) * 4) as i32;
    let stack_i = (((USER_STACK_VA >> 12) & 0x3FF) * 4) as i32;
    let frame = (ktop - 4 * setup_task_frame_dwords()) as i32;
    let (uss, uesp, eflags, ucs, ueip) =
        (i32::from(USER_DS), USER_STACK_TOP as i32, 0x202, i32::from(USER_CS), entry as i32);
    let f = |n: i32| frame + 4 * n;
    let (ktopi, pdv) = (ktop as i32, pd as i32);
    let (pd1, pt_code, pt_shared, pt_stack) = (pdi + 4, pti + ucode_i, pti + shared_i, pti + stack_i);
    let (f14, f13, f12, f11, f10) = (f(14), f(13), f(12), f(11), f(10));
    let (ksp_t, cr3_t, pts_t, ktop_t, alive_t) = (KSP + 4 * t, CR3S + 4 * t, PTS + 4 * t, KTOP + 4 * t, ALIVE + 4 * t);
    x86!(k;
        mov DWORD [pdi], kpt
        ; mov DWORD [pd1], upt
        ; mov DWORD [pt_code], code
        ; mov DWORD [pt_shared], shared
        ; mov DWORD [pt_stack], stack
        ; mov DWORD [f14], uss
        ; mov DWORD [f13], uesp
        ; mov DWORD [f12], eflags
        ; mov DWORD [f11], ucs
        ; mov DWORD [f10], ueip
        ; mov DWORD [ksp_t], frame
        ; mov DWORD [cr3_t], pdv
        ; mov DWORD [pts_t], pti
        ; mov DWORD [ktop_t], ktopi
        ; mov DWORD [alive_t], 1
    );
}

/// The two user programs (assembled at USER_VA) and their strings.
fn user_code() -> ([u32; 2], Vec<u8>, Strings) {
    let mut u = Asm::new(USER_VA);
    let mut us = Strings::new(USER_STRINGS_VA, USER_VA + 0x1000);
    let sys_print = |u: &mut Asm, s: u32| {
        let s = s as i32;
        x86!(u; mov eax, 1 ; mov ebx, s);
        u.int(VEC_SYSCALL);
    };
    let touch = |u: &mut Asm, pages: i32| {
        let l = u.label();
        let heap = HEAP_VA as i32;
        x86!(u;
            mov edi, heap
            ; mov ecx, pages
            ; =>l
            ; mov [edi], ecx
            ; add edi, 0x1000
            ; dec ecx
            ; jnz =>l
        );
    };
    let wait_ticks = |u: &mut Asm, n: i32| {
        let l = u.label();
        let shared = SHARED_VA as i32;
        x86!(u;
            mov eax, [shared]
            ; add eax, n
            ; =>l
            ; pause
            ; cmp [shared], eax
            ; jb =>l
        );
    };

    let a = u.here();
    sys_print(&mut u, us.add("[A] hello from user mode (CPL 3)\n"));
    touch(&mut u, 3);
    sys_print(&mut u, us.add("[A] wrote 3 heap pages\n"));
    wait_ticks(&mut u, 6);
    sys_print(&mut u, us.add("[A] reading kernel memory at 0x00100000...\n"));
    let kernel = LOAD_ADDR as i32;
    let spin_a = u.label();
    x86!(u; mov eax, [kernel] ; =>spin_a ; jmp =>spin_a);

    let b = u.here();
    sys_print(&mut u, us.add("[B] hello from user mode (CPL 3)\n"));
    touch(&mut u, 2);
    sys_print(&mut u, us.add("[B] wrote 2 heap pages\n"));
    wait_ticks(&mut u, 2);
    sys_print(&mut u, us.add("[B] dividing by zero...\n"));
    let spin_b = u.label();
    x86!(u; xor ecx, ecx ; mov eax, 1 ; xor edx, edx ; div ecx ; =>spin_b ; jmp =>spin_b);

    let code = u.finish();
    assert!(code.len() <= 0x800, "demo user code is {} bytes", code.len());
    ([a, b], code, us)
}
