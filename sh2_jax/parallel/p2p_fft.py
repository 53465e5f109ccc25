def p2p_gated_modal(*a): raise NotImplementedError
