//! Who sends where: the routes of every simulated user, the groups and
//! broadcast lists they form, and how messages are numbered per route.

use courier_protocol::Destination;
use rand::SeedableRng;

use crate::options::{Options, Scenario};

/// Where one user sends: a user, a group or a broadcast list (indexes into
/// the plan's groups and lists).
#[derive(Clone, Copy)]
pub(crate) enum Dest {
    User(u64),
    Group(usize),
    List(usize),
}

/// One of a user's destinations: who receives it, how often it is chosen.
#[derive(Clone)]
pub(crate) struct Route {
    pub dest: Dest,
    pub recipients: Vec<u64>,
    pub weight: u32,
    /// A recipient who opts out during the run (the business scenario):
    /// an acknowledgement that counts one recipient fewer than
    /// `recipients` was sent after the opt-out, without them.
    pub leaving: Option<u64>,
}

/// Who sends where: per user, its routes (none: it only receives); the
/// groups' members; the lists' (business, every customer, consenting).
pub(crate) struct Plan {
    pub routes: Vec<Vec<Route>>,
    pub groups: Vec<Vec<u64>>,
    pub lists: Vec<(u64, Vec<u64>, Vec<u64>)>,
}

/// What the senders need to name destinations on the target.
pub(crate) struct Routes {
    pub group_ids: Vec<u64>,
    /// Consenting recipients per list (peers have no lists: the sender
    /// writes to each, as an application on them would).
    pub lists: Vec<Vec<u64>>,
    pub tag: u64,
    /// Senders send the business scenario's template (its payload a
    /// `TemplateSend` whose one parameter is the stamp, in hex).
    pub template: bool,
}

/// The template every business of the business scenario has.
pub(crate) const TEMPLATE: &str = "load";

/// A `TemplateSend` of [`TEMPLATE`] carrying `stamp` (hex) as `{{1}}`.
pub(crate) fn template_payload(stamp: &[u8]) -> bytes::Bytes {
    courier_protocol::business::TemplateSend {
        name: TEMPLATE.into(),
        language: String::new(),
        params: vec![(String::new(), courier_protocol::token::encode_hex(stamp))],
    }
    .encode()
}

/// The stamp of a template message the business scenario sent.
pub(crate) fn template_stamp(payload: &[u8]) -> Option<Vec<u8>> {
    let t = courier_protocol::business::TemplateMessage::decode(payload).ok()?;
    courier_protocol::token::decode_hex(&t.body)
}

/// The number each sender gives its one broadcast list.
pub(crate) const LIST_ID: u64 = 1;

impl Routes {
    /// Where `dest` is on Courier (and the relay).
    pub(crate) fn destination(&self, dest: Dest) -> Destination {
        match dest {
            Dest::User(u) => Destination::User(u),
            Dest::Group(g) => Destination::Group(self.group_ids[g]),
            Dest::List(_) => Destination::List(LIST_ID),
        }
    }
}

/// User ids fit in the low 48 bits; a conversation is a user's route:
/// `user | route << 48` (a sender's messages to its partner and to its
/// group are two conversations, each ordered on its own).
const USER_BITS: u32 = 48;

pub(crate) fn conversation(user: u64, route: usize) -> u64 {
    user | (route as u64) << USER_BITS
}

pub(crate) fn sender_of(conversation: u64) -> u64 {
    conversation & ((1 << USER_BITS) - 1)
}

/// The client message id of message `n` on `route` in the run `tag`:
/// unique per sender across routes, and across runs that reuse user ids.
pub(crate) fn client_msg_id(tag: u64, route: usize, n: u64) -> u64 {
    (tag & 0xFFFF) << 48 | (route as u64 & 0xFF) << 40 | n
}

/// (route, n) of a client message id of the run `tag` ([`client_msg_id`]
/// backwards); `None` for another run's.
pub(crate) fn route_and_number(tag: u64, id: u64) -> Option<(usize, u64)> {
    (id >> 48 == tag & 0xFFFF).then_some((((id >> 40) & 0xFF) as usize, id & ((1 << 40) - 1)))
}

/// A sender's numbering of its messages: which route each takes (by
/// weight, from an RNG seeded by the user, so runs repeat) and its number
/// on that route.
pub(crate) struct Numbering {
    pub rng: rand::rngs::StdRng,
    per_route: Vec<u64>,
    /// Messages numbered so far (the pacer's count).
    pub count: u64,
}

impl Numbering {
    pub(crate) fn new(me: u64, routes: usize) -> Numbering {
        Numbering {
            rng: rand::rngs::StdRng::seed_from_u64(me),
            per_route: vec![0; routes],
            count: 0,
        }
    }

    /// The next message: (route, its number on that route).
    pub(crate) fn next(&mut self, routes: &[Route]) -> (usize, u64) {
        self.count += 1;
        let ri = pick(routes, &mut self.rng);
        self.per_route[ri] += 1;
        (ri, self.per_route[ri])
    }
}

/// Picks a route by weight.
fn pick(routes: &[Route], rng: &mut impl rand::Rng) -> usize {
    if routes.len() == 1 {
        return 0;
    }
    let total: u32 = routes.iter().map(|r| r.weight).sum();
    let mut x = rng.gen_range(0..total);
    for (i, r) in routes.iter().enumerate() {
        if x < r.weight {
            return i;
        }
        x -= r.weight;
    }
    routes.len() - 1
}

/// Cuts `users` into groups whose sizes follow `sizes` (size, weight) in
/// a repeating pattern; a remainder too small for a group joins the last.
fn carve(users: &[u64], sizes: &[(usize, u32)]) -> Vec<Vec<u64>> {
    let pattern: Vec<usize> = sizes
        .iter()
        .flat_map(|&(size, w)| std::iter::repeat_n(size.max(2), w as usize))
        .collect();
    let mut groups: Vec<Vec<u64>> = Vec::new();
    let mut rest = users;
    let mut i = 0;
    while rest.len() >= 2 {
        let k = pattern[i % pattern.len()].min(rest.len());
        groups.push(rest[..k].to_vec());
        rest = &rest[k..];
        i += 1;
    }
    if let (Some(last), false) = (groups.last_mut(), rest.is_empty()) {
        last.extend_from_slice(rest);
    }
    groups
}

fn group_routes(groups: &[Vec<u64>], weight: u32) -> std::collections::HashMap<u64, Route> {
    let mut by_user = std::collections::HashMap::new();
    for (gi, members) in groups.iter().enumerate() {
        for &u in members {
            let others = members.iter().copied().filter(|&m| m != u).collect();
            by_user.insert(
                u,
                Route {
                    dest: Dest::Group(gi),
                    recipients: others,
                    weight,
                    leaving: None,
                },
            );
        }
    }
    by_user
}

pub(crate) fn plan(opts: &Options) -> anyhow::Result<Plan> {
    let users: Vec<u64> = (0..opts.users).map(|i| opts.first_user + i).collect();
    anyhow::ensure!(
        opts.first_user + opts.users < 1 << USER_BITS,
        "user ids must stay below 2^48"
    );
    anyhow::ensure!(!opts.group_sizes.is_empty(), "no group sizes given");
    let pairs = || -> anyhow::Result<Vec<Route>> {
        anyhow::ensure!(
            opts.users >= 2 && opts.users.is_multiple_of(2),
            "{:?} needs an even number of users",
            opts.scenario
        );
        Ok((0..users.len())
            .map(|i| Route {
                dest: Dest::User(users[i ^ 1]),
                recipients: vec![users[i ^ 1]],
                weight: 7,
                leaving: None,
            })
            .collect())
    };
    match opts.scenario {
        Scenario::OneToOne | Scenario::Reconnect => Ok(Plan {
            routes: pairs()?.into_iter().map(|r| vec![r]).collect(),
            groups: Vec::new(),
            lists: Vec::new(),
        }),
        Scenario::Idle => Ok(Plan {
            routes: vec![Vec::new(); users.len()],
            groups: Vec::new(),
            lists: Vec::new(),
        }),
        Scenario::Group | Scenario::Mixed => {
            anyhow::ensure!(users.len() >= 2, "groups need at least 2 users");
            let groups = carve(&users, &opts.group_sizes);
            let mut in_group = group_routes(&groups, 3);
            let routes = if opts.scenario == Scenario::Group {
                users
                    .iter()
                    .map(|u| in_group.remove(u).into_iter().collect())
                    .collect()
            } else {
                pairs()?
                    .into_iter()
                    .zip(&users)
                    .map(|(pair, u)| std::iter::once(pair).chain(in_group.remove(u)).collect())
                    .collect()
            };
            Ok(Plan {
                routes,
                groups,
                lists: Vec::new(),
            })
        }
        Scenario::Broadcast | Scenario::Business => {
            let k = opts.group_sizes[0].0.max(1) + 1;
            anyhow::ensure!(
                opts.users as usize >= k,
                "broadcast needs at least list size + 1 users"
            );
            let mut routes = Vec::with_capacity(users.len());
            let mut lists = Vec::new();
            for block in users.chunks(k) {
                let business = block[0];
                let customers = block[1..].to_vec();
                let consenting: Vec<u64> = customers
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % 10 != 9)
                    .map(|(_, &c)| c)
                    .collect();
                // The business scenario: the ninth customer opts out
                // half-way through the run.
                let leaving = (opts.scenario == Scenario::Business)
                    .then(|| customers.get(8).copied())
                    .flatten();
                routes.push(vec![Route {
                    dest: Dest::List(lists.len()),
                    recipients: consenting.clone(),
                    weight: 1,
                    leaving,
                }]);
                routes.extend(customers.iter().map(|_| Vec::new()));
                lists.push((business, customers, consenting));
            }
            Ok(Plan {
                routes,
                groups: Vec::new(),
                lists,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receipt names messages by client id: the route and number come
    /// back out of it, and another run's ids are not this run's.
    #[test]
    fn client_ids_give_back_their_route_and_number() {
        let tag = 0x1234_5678;
        let id = client_msg_id(tag, 3, 987_654);
        assert_eq!(route_and_number(tag, id), Some((3, 987_654)));
        assert_eq!(route_and_number(tag + 1, id), None);
    }
}
