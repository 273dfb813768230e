use iced_x86::code_asm::*;
use monitor::host::Exit;
use popek_tests::*;

#[test]
fn ud2_exits_with_registers() {
    let mut g = Guest::new();
    g.load(|a| {
        a.mov(eax, 0x1234)?;
        a.ud2()
    });
    let exit = g.vcpu.run().unwrap();
    assert_eq!(exit, Exit::InvalidOpcode);
    let r = g.vcpu.regs();
    assert_eq!(r.eax, 0x1234);
    assert_eq!(r.eip, CODE + 5);
}
